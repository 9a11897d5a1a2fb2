#!/bin/bash
# Stand-in for the official Dask image's prepare.sh: only what the tests rely on.
if [ "$EXTRA_PIP_PACKAGES" ]; then
    echo "EXTRA_PIP_PACKAGES environment variable found. Installing."
    # Word splitting on purpose: a list of requirements, as in the official script.
    # shellcheck disable=SC2086
    /opt/conda/bin/pip install $EXTRA_PIP_PACKAGES
fi
"$@"
