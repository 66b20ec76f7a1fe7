//! dovegate with grants shared through MariaDB (issue 23): a private `mariadbd` on
//! loopback per test (tests/support/mariadb.rs), real writers and replicas.

#[path = "support/mariadb.rs"]
mod mariadb;

use mariadb::Maria;

#[test]
fn private_server_starts_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = Maria::start(tmp.path());
    assert_eq!(m.sql("SELECT 1+1"), "2");
    // Only loopback, and the socket in the temp dir: no system instance involved.
    assert!(m.root("SELECT @@bind_address").contains("127.0.0.1"));
    m.down();
    assert!(m
        .sql_as(mariadb::USER, mariadb::PASSWORD, "SELECT 1")
        .is_err());
    m.up();
    assert_eq!(m.sql("SELECT 2"), "2");
}
