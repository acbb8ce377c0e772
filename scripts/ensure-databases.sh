#!/usr/bin/env bash
# Make sure the databases of the outbox tests answer: PostgreSQL on 127.0.0.1:5432 (database `test`,
# trust auth for 127.0.0.1) and MariaDB on 127.0.0.1:3306 (root without password, database `test`).
# Starts them, or installs them with apt-get (as root) when missing. Never stops a running server.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$1 is not running and this user is not root: start it (see scripts/ensure-databases.sh)" >&2
        exit 1
    fi
}
wait_port() {
    for _ in $(seq 1 60); do
        port_open "$1" && return 0
        sleep 1
    done
    echo "$2 did not come up on 127.0.0.1:$1 within 60 s" >&2
    exit 1
}
apt_install() {
    if [ -z "${APT_UPDATED:-}" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# -- PostgreSQL ----------------------------------------------------------------------------------------
if ! port_open 5432; then
    as_root PostgreSQL
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        echo "Installing PostgreSQL with apt-get..."
        apt_install postgresql
    fi
    version=$(ls /etc/postgresql | sort -V | tail -1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    if ! grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust' "$hba"  # first match wins: trust the loopback
    fi
    echo "Starting PostgreSQL $version..."
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_port 5432 PostgreSQL
fi
if ! psql -h 127.0.0.1 -U postgres -d test -Atc "select 1" >/dev/null 2>&1; then
    as_root "PostgreSQL's database test"
    su postgres -c "createdb test" 2>/dev/null || true
    psql -h 127.0.0.1 -U postgres -d test -Atc "select 1" >/dev/null
fi
echo "PostgreSQL is up on 127.0.0.1:5432 (database test)"

# -- MariaDB -------------------------------------------------------------------------------------------
if ! port_open 3306; then
    as_root MariaDB
    if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
        echo "Installing MariaDB with apt-get..."
        apt_install mariadb-server
    fi
    echo "Starting MariaDB..."
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    (/usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 >/var/log/mariadb-tests.log 2>&1 &)
    wait_port 3306 MariaDB
fi
if ! mysql -h 127.0.0.1 -uroot -e "select 1" test >/dev/null 2>&1; then
    as_root "MariaDB's database test"
    # A fresh Debian MariaDB lets root in through the socket only: allow it over TCP without a password
    # (a test server on the loopback), and create the database.
    mysql -uroot -e "CREATE DATABASE IF NOT EXISTS test; \
        ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); \
        CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; \
        GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES;"
    mysql -h 127.0.0.1 -uroot -e "select 1" test >/dev/null
fi
echo "MariaDB is up on 127.0.0.1:3306 (database test)"
