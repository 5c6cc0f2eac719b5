module github.com/mirrorgate/traefik-mirror

go 1.22
