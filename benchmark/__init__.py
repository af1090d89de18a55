"""The `detdeploy bench` library: per-stage latency of backends in alternating rounds, its
statistics, system description and report. (The `bench/` folder at the top holds standalone
benchmark scripts that use this library.) Never imports the CLI."""
