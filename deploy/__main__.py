"""`python -m detdeploy` runs the CLI."""
from detdeploy.cli import main

main()
