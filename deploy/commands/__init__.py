"""One module per `detdeploy` command; `detdeploy.cli` registers them."""
