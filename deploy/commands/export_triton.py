"""`detdeploy export-triton`: (being written)."""
import click


@click.command('export-triton')
def export_triton():
    """(being written)"""
