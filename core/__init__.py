"""The torch-free contract every room shares: errors, atomic file writing, and what a model file
is (task and output schema, preprocessing, NMS settings, metadata, detections).

Imports nothing else of detdeploy's and never torch; numpy is its only third-party dependency.
"""
