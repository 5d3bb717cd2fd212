//! MongoDB for the tests that need one. No MongoDB server can be installed on these
//! machines: `scripts/dev test` serves the wire-protocol stand-in of `../shared/mongo-standin`
//! and exports its address as `MONGODB_URL`; a real server's address works the same way (and
//! is better: the stand-in is not MongoDB). Each test gets a database of its own on it.

/// Why a suite is skipped, and how to run it.
const NOT_SET: &str = "MONGODB_URL is not set (no MongoDB server can be installed on these \
    machines; `scripts/dev test` starts the MongoDB wire-protocol stand-in of \
    ../shared/mongo-standin and sets it; to run the suite by hand, `scripts/dev services` \
    prints the value to export, or set MONGODB_URL='mongodb://HOST:PORT/?directConnection=true' \
    to a MongoDB of your own)";

/// `MONGODB_URL` with a fresh database of its own in the path, for test `test` (its name in
/// the message). Unset (or empty): prints `SKIPPED <test>: …` to stderr and returns `None`,
/// so the test returns early; under `CI=true` it panics instead, since a CI run must not
/// silently skip the MongoDB suites.
pub fn mongo_url(test: &str) -> Option<String> {
    match std::env::var("MONGODB_URL") {
        Ok(url) if !url.trim().is_empty() => Some(with_database(
            url.trim(),
            &format!("test_{}", crate::unique_suffix()),
        )),
        _ => {
            let message = format!("SKIPPED {test}: {NOT_SET}");
            if std::env::var("CI").is_ok_and(|ci| ci == "true") {
                panic!("{message}; CI=true, so this is a failure, not a skip");
            }
            eprintln!("{message}");
            None
        }
    }
}

/// `url` (`mongodb://[user:pass@]hosts[/db][?options]`, or `mongodb+srv://…`) naming
/// `database` in its path, its options kept. A URL with credentials authenticates against
/// the database of its path (or `admin` without one) unless it says `authSource`; that
/// database is then put in `authSource`, so the login still works on the new database.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, options) = url.split_once('?').unwrap_or((url, ""));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    // The host list ends at the first '/' after the scheme: a '/' in a user name or a
    // password must be percent-encoded.
    let (hosts, old_database) = match base[scheme_end..].find('/') {
        Some(i) => (&base[..scheme_end + i], &base[scheme_end + i + 1..]),
        None => (base, ""),
    };
    let mut options: Vec<String> = options
        .split('&')
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect();
    let has_credentials = hosts[scheme_end..].contains('@');
    let names_auth_source = options.iter().any(|o| {
        o.split('=')
            .next()
            .is_some_and(|key| key.eq_ignore_ascii_case("authSource"))
    });
    if has_credentials && !names_auth_source {
        let source = if old_database.is_empty() {
            "admin"
        } else {
            old_database
        };
        options.push(format!("authSource={source}"));
    }
    if options.is_empty() {
        format!("{hosts}/{database}")
    } else {
        format!("{hosts}/{database}?{}", options.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_is_put_in_the_path_and_the_options_kept() {
        assert_eq!(
            with_database("mongodb://127.0.0.1:17017/?directConnection=true", "t1"),
            "mongodb://127.0.0.1:17017/t1?directConnection=true"
        );
        assert_eq!(
            with_database("mongodb://127.0.0.1:17017", "t1"),
            "mongodb://127.0.0.1:17017/t1"
        );
        assert_eq!(
            with_database("mongodb://127.0.0.1:17017/", "t1"),
            "mongodb://127.0.0.1:17017/t1"
        );
        assert_eq!(
            with_database(
                "mongodb://a:1,b:2,c:3/school?replicaSet=rs0&w=majority",
                "t1"
            ),
            "mongodb://a:1,b:2,c:3/t1?replicaSet=rs0&w=majority"
        );
        assert_eq!(
            with_database("mongodb+srv://cluster0.example.net/school", "t1"),
            "mongodb+srv://cluster0.example.net/t1"
        );
    }

    #[test]
    fn credentials_keep_authenticating_where_they_did() {
        // The path's database was the authentication database.
        assert_eq!(
            with_database("mongodb://u:p@h:27017/school", "t1"),
            "mongodb://u:p@h:27017/t1?authSource=school"
        );
        // No path: the default authentication database, admin.
        assert_eq!(
            with_database("mongodb://u:p@h:27017/?tls=true", "t1"),
            "mongodb://u:p@h:27017/t1?tls=true&authSource=admin"
        );
        // Said explicitly (option names are case-insensitive): left alone.
        assert_eq!(
            with_database("mongodb://u:p%2F@h/school?authsource=admin", "t1"),
            "mongodb://u:p%2F@h/t1?authsource=admin"
        );
    }
}
