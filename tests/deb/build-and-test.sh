#!/usr/bin/env bash
# Build the Debian package from a copy of the tree, lint it, install it with apt-get, run the
# installed daemon as its systemd unit does (alone and behind Postfix in the end-to-end lab),
# then purge it and check that only its system user is left: the tests in tests/deb, plus the
# man page tests, with Debian's own python3 and pytest.
#
# Usage (as root, from anywhere): bash tests/deb/build-and-test.sh [extra pytest arguments]
#   POLICYD_IPV6_DEB_REF=HEAD  build from that commit instead of the work tree's files
#   CI=true                    a test skipped for a missing tool or root is a failure
# Exit status: pytest's (0: everything passed), or 2 when not run as root.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
    echo "tests/deb/build-and-test.sh: must run as root (it installs and purges a Debian" \
         "package and builds network namespaces); try: sudo bash $0" >&2
    exit 2
fi

started=$(date +%s)
status=0
# No byte code and no pytest cache in the work tree: the build copies it.
PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 -m pytest -p no:cacheprovider -ra \
    tests/deb tests/test_manpages.py "$@" || status=$?
echo "tests/deb/build-and-test.sh: exit status $status after $(( $(date +%s) - started )) s"
exit "$status"
