#!/bin/sh
# The image's entrypoint (installed as /usr/local/bin/meshdns-entrypoint).
#   docker run IMAGE                    meshdns serve --config /etc/meshdns/config.yaml
#   docker run IMAGE --example          the same, serving the example catalog (demo data)
#   docker run IMAGE --listen ...       any other serve options, after the baked-in config
#   docker run IMAGE check              a meshdns command (check, query, serve ...) as given
# The baked-in config names /etc/meshdns/catalog.yaml, which the image does not contain: mount
# your catalog there (or a directory with config.yaml and catalog.yaml over /etc/meshdns).
# Without one, meshdns refuses to start and says so, rather than serve demo addresses.
set -eu
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- serve --config "${MESHDNS_CONFIG:-/etc/meshdns/config.yaml}" "$@"
fi
exec meshdns "$@"
