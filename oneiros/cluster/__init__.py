"""Scale-out on Ray Serve: models placed onto engine replicas (`placement`, `config`), an ingress
that serves the single server's routes over them (`client`, `app`)."""
