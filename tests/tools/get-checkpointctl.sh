#!/bin/sh
# Put Debian's checkpointctl (trixie, 1.3.0) at $DEST/checkpointctl for the tests, without
# installing anything: on Debian 12 it needs trixie's libc (GLIBC_2.38), so both .debs are
# unpacked under $DEST and the wrapper runs the binary through that libc's loader. On a
# Debian 13 node `apt-get install checkpointctl` gives the same program.
set -eu
DEST=${1:-/opt/migrt/test/checkpointctl}
if command -v checkpointctl >/dev/null 2>&1 && checkpointctl --help >/dev/null 2>&1; then
    mkdir -p "$DEST"
    ln -sf "$(command -v checkpointctl)" "$DEST/checkpointctl"
    exit 0
fi
mkdir -p "$DEST/apt/lists/partial" "$DEST/apt/cache/archives/partial" "$DEST/etc"
cat > "$DEST/etc/trixie.sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
set -- -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$DEST/etc" \
    -o "Dir::State::Lists=$DEST/apt/lists" -o "Dir::Cache=$DEST/apt/cache" \
    -o Dir::Etc::Preferences=/dev/null -o "Dir::Etc::PreferencesParts=$DEST/etc" \
    -o APT::Sandbox::User=root
apt-get "$@" -qq update
cd "$DEST"
rm -f ./*.deb
apt-get "$@" -qq download checkpointctl libc6
rm -rf root
for deb in ./*.deb; do dpkg-deb -x "$deb" root; done
cat > checkpointctl <<W
#!/bin/sh
# Debian trixie's checkpointctl with trixie's libc, unpacked by tests/tools/get-checkpointctl.sh
exec $DEST/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path $DEST/root/usr/lib/x86_64-linux-gnu $DEST/root/usr/bin/checkpointctl "\$@"
W
chmod 755 checkpointctl
"$DEST/checkpointctl" --help >/dev/null
