#!/bin/sh
# Patroni runs this once, on the node that initialised the cluster, with a connection URL:
# walletd's database (its user is the superuser Patroni created).
set -eu
psql -v ON_ERROR_STOP=1 -d "$1" -c "CREATE DATABASE walletd"
