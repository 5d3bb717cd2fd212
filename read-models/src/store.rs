//! The port every read model implements for the consume loop: apply a batch of events with
//! the checkpoint, exactly once in effect.

use std::future::Future;

use events::{Event, Projection};

/// How a batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Events whose effect was written now.
    pub applied: usize,
    /// Events at or below the checkpoint: already applied before (re-delivery).
    pub skipped: usize,
    /// The checkpoint after the batch.
    pub checkpoint: u64,
}

/// Why a store could not apply a batch.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store is unreachable or overloaded; the same batch will succeed later.
    #[error("read model unavailable: {0}")]
    Unavailable(String),
    /// The store refused the data itself; retrying the same events fails the same way.
    #[error("read model refused the batch: {0}")]
    Refused(String),
    /// Another replica has claimed the projection with a newer lease token: this one must
    /// stop writing (nothing of the batch was written to the checkpointed store).
    #[error("fenced: {0}")]
    Fenced(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if is_transient_sqlx(&error) {
            StoreError::Unavailable(error.to_string())
        } else {
            StoreError::Refused(error.to_string())
        }
    }
}

/// Whether a sqlx error means "not now" (the consume loop waits and retries the same batch
/// for as long as it takes) rather than "not these events" (after a few refusals the loop
/// isolates the events and dead-letters them, moving the checkpoint past them).
///
/// When in doubt, waiting is the safe side: a projection that waits shows as lag and in the
/// logs and loses nothing, while a dead letter takes a valid event out of the read model
/// until someone redrives it. So only errors caused by the events' own values, or by a
/// schema that does not fit the code, are refusals.
pub fn is_transient_sqlx(error: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match error {
        E::Database(database) => database
            .code()
            .is_some_and(|code| is_transient_sqlstate(&code)),
        // A value the events carry did not fit (encode, decode), or the schema does not fit
        // the statements: the same events fail the same way next time.
        E::Encode(_)
        | E::Decode(_)
        | E::ColumnDecode { .. }
        | E::TypeNotFound { .. }
        | E::ColumnNotFound(_)
        | E::ColumnIndexOutOfBounds { .. }
        | E::InvalidArgument(_)
        | E::RowNotFound
        | E::AnyDriverError(_) => false,
        // The connection, the pool, the driver or its configuration: nothing about the
        // events (`PoolClosed` also comes during shutdown, when nothing may be dead-lettered).
        E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed
        | E::Configuration(_)
        | E::BeginFailed
        | E::InvalidSavePointStatement
        | E::Migrate(_) => true,
        // Variants added by a later sqlx: wait rather than drop events.
        _ => true,
    }
}

/// Whether a PostgreSQL error code (SQLSTATE) is a condition of the server, its connection
/// or concurrent work, which passes, rather than a refusal of the statement's data.
///
/// Classes (the first two characters, PostgreSQL's "Appendix A. Error Codes"; a code ending
/// in `000` is the class's code for a condition with no more specific one):
/// - `08` connection exception, `57` operator intervention (`57014` query_canceled also
///   covers `statement_timeout`; admin/crash shutdown, cannot_connect_now, database_dropped,
///   idle_session_timeout), `58` system error (I/O, files outside PostgreSQL's control), `53`
///   insufficient resources (disk full, out of memory, too many connections), `72` snapshot
///   too old (a new transaction takes a new snapshot);
/// - `40` transaction rollback (`40001` serialization_failure and `40P01` deadlock_detected,
///   the two the manual's "Serialization Failure Handling" says to retry, `40003`
///   statement_completion_unknown), except `40002` transaction_integrity_constraint_violation,
///   a constraint violation like class `23`;
/// - `28` invalid authorization and `3D000` invalid_catalog_name: a connection that could not
///   be opened (rotated password, `pg_hba.conf`, database renamed), before any statement ran;
/// - `XX` internal error (`XX000`, data_corrupted `XX001`, index_corrupted `XX002`): a fault of
///   the server, not of the events; they apply once it is repaired (REINDEX, failover),
///   whereas refusing would dead-letter every valid event meanwhile.
///
/// Single codes: `25006` read_only_sql_transaction (a standby, or a primary demoted by a
/// failover), `25P03` idle_in_transaction_session_timeout (the server ended the session),
/// `55P03` lock_not_available (`lock_timeout`, `NOWAIT`), `55006` object_in_use, and `55000`
/// object_not_in_prerequisite_state: the state of an object (a table without replica
/// identity in a publication, recovery in progress), never the values of the events, so
/// refusing would dead-letter every event until someone changes that state.
///
/// Everything else is a refusal: data exceptions (`22`), integrity constraints (`23`),
/// program limits (`54`), syntax, undefined objects and privileges (`42`), invalid
/// transaction states other than the above (`25`), …
pub fn is_transient_sqlstate(code: &str) -> bool {
    let code = code.to_ascii_uppercase();
    let class = code.get(..2).unwrap_or_default();
    match class {
        "08" | "28" | "53" | "57" | "58" | "72" | "XX" => true,
        "40" => code != "40002",
        _ => matches!(
            code.as_str(),
            "25006" | "25P03" | "3D000" | "55000" | "55006" | "55P03"
        ),
    }
}

/// A read model fed by one projection.
///
/// Implementations keep the checkpoint (last applied stream sequence) with the data, in the
/// same transaction or behind per-record version guards, and skip what is at or below it.
pub trait ProjectionStore: Clone + Send + Sync + 'static {
    fn projection(&self) -> Projection;

    /// Last stream sequence applied (0 before the first event).
    fn checkpoint(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Applies `(stream sequence, event)` pairs in stream order and moves the checkpoint to
    /// `through_sequence` (the batch may end with events dead-lettered instead of applied).
    fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> impl Future<Output = Result<BatchOutcome, StoreError>> + Send;

    /// Whether the store answers (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Claims the projection for the lease token `token` (fencing): records it with the
    /// checkpoint unless a newer one is recorded (then [`StoreError::Fenced`]), and makes
    /// every later batch of this store (and its clones) commit only while no newer token
    /// has been recorded. A store never claimed writes with token 0.
    fn claim(&self, token: u64) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The lease token a store writes with, shared by its clones.
#[derive(Debug, Clone, Default)]
pub struct FenceToken(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl FenceToken {
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set(&self, token: u64) {
        self.0.store(token, std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// Every SQLSTATE of PostgreSQL 15 (`src/backend/utils/errcodes.txt`, installed as
    /// `/usr/share/postgresql/15/errcodes.txt`), in that file's order.
    const POSTGRES_15_SQLSTATES: &[&str] = &[
        "00000", "01000", "0100C", "01008", "01003", "01007", "01006", "01004", "01P01", "02000",
        "02001", "03000", "08000", "08003", "08006", "08001", "08004", "08007", "08P01", "09000",
        "0A000", "0B000", "0F000", "0F001", "0L000", "0LP01", "0P000", "0Z000", "0Z002", "20000",
        "21000", "22000", "2202E", "22021", "22008", "22012", "22005", "2200B", "22022", "22015",
        "2201E", "22014", "22016", "2201F", "2201G", "22018", "22007", "22019", "2200D", "22025",
        "22P06", "22010", "22023", "22013", "2201B", "2201W", "2201X", "2202H", "2202G", "22009",
        "2200C", "2200G", "22004", "22002", "22003", "2200H", "22026", "22001", "22011", "22027",
        "22024", "2200F", "22P01", "22P02", "22P03", "22P04", "22P05", "2200L", "2200M", "2200N",
        "2200S", "2200T", "22030", "22031", "22032", "22033", "22034", "22035", "22036", "22037",
        "22038", "22039", "2203A", "2203B", "2203C", "2203D", "2203E", "2203F", "2203G", "23000",
        "23001", "23502", "23503", "23505", "23514", "23P01", "24000", "25000", "25001", "25002",
        "25008", "25003", "25004", "25005", "25006", "25007", "25P01", "25P02", "25P03", "26000",
        "27000", "28000", "28P01", "2B000", "2BP01", "2D000", "2F000", "2F005", "2F002", "2F003",
        "2F004", "34000", "38000", "38001", "38002", "38003", "38004", "39000", "39001", "39004",
        "39P01", "39P02", "39P03", "3B000", "3B001", "3D000", "3F000", "40000", "40002", "40001",
        "40003", "40P01", "42000", "42601", "42501", "42846", "42803", "42P20", "42P19", "42830",
        "42602", "42622", "42939", "42804", "42P18", "42P21", "42P22", "42809", "428C9", "42703",
        "42883", "42P01", "42P02", "42704", "42701", "42P03", "42P04", "42723", "42P05", "42P06",
        "42P07", "42712", "42710", "42702", "42725", "42P08", "42P09", "42P10", "42611", "42P11",
        "42P12", "42P13", "42P14", "42P15", "42P16", "42P17", "44000", "53000", "53100", "53200",
        "53300", "53400", "54000", "54001", "54011", "54023", "55000", "55006", "55P02", "55P03",
        "55P04", "57000", "57014", "57P01", "57P02", "57P03", "57P04", "57P05", "58000", "58030",
        "58P01", "58P02", "72000", "F0000", "F0001", "HV000", "HV005", "HV002", "HV010", "HV021",
        "HV024", "HV007", "HV008", "HV004", "HV006", "HV091", "HV00B", "HV00C", "HV00D", "HV090",
        "HV00A", "HV009", "HV014", "HV001", "HV00P", "HV00J", "HV00K", "HV00Q", "HV00R", "HV00L",
        "HV00M", "HV00N", "P0000", "P0001", "P0002", "P0003", "P0004", "XX000", "XX001", "XX002",
    ];

    /// The codes to wait out, written out one by one (not by class, as the code under test
    /// decides), so a class rule that reaches too far or not far enough shows here.
    #[rustfmt::skip]
    const TRANSIENT: &[&str] = &[
        // connection exception
        "08000", "08003", "08006", "08001", "08004", "08007", "08P01",
        // read-only transaction (standby, demoted primary), idle-in-transaction timeout
        "25006", "25P03",
        // invalid authorization specification, invalid password; database does not exist
        "28000", "28P01", "3D000",
        // transaction rollback, less transaction_integrity_constraint_violation
        "40000", "40001", "40003", "40P01",
        // insufficient resources
        "53000", "53100", "53200", "53300", "53400",
        // object not in prerequisite state, object in use, lock not available
        "55000", "55006", "55P03",
        // operator intervention
        "57000", "57014", "57P01", "57P02", "57P03", "57P04", "57P05",
        // system error
        "58000", "58030", "58P01", "58P02",
        // snapshot too old
        "72000",
        // internal error
        "XX000", "XX001", "XX002",
    ];

    #[test]
    fn every_postgres_sqlstate_is_classified_as_the_table_says() {
        assert_eq!(POSTGRES_15_SQLSTATES.len(), 260);
        let wrong: Vec<(&str, bool)> = POSTGRES_15_SQLSTATES
            .iter()
            .map(|code| (*code, is_transient_sqlstate(code)))
            .filter(|(code, transient)| *transient != TRANSIENT.contains(code))
            .collect();
        assert!(
            wrong.is_empty(),
            "misclassified (code, transient): {wrong:?}"
        );
        // The expected list names only codes PostgreSQL has.
        for code in TRANSIENT {
            assert!(POSTGRES_15_SQLSTATES.contains(code), "{code}");
        }
    }

    #[test]
    fn the_cases_of_the_issue_are_waited_for_and_bad_data_is_refused() {
        for (code, what) in [
            ("55P03", "lock_timeout"),
            ("57014", "statement_timeout"),
            ("40P01", "deadlock"),
            ("40001", "serialization failure"),
            ("57P01", "admin shutdown"),
            ("25006", "read-only after a failover"),
            ("53100", "disk full"),
        ] {
            assert!(is_transient_sqlstate(code), "{what} ({code})");
        }
        for (code, what) in [
            ("23505", "unique violation"),
            ("23503", "foreign key violation"),
            ("22001", "string too long"),
            ("22P02", "invalid text representation"),
            ("42P01", "undefined table"),
            ("54000", "program limit exceeded"),
            ("40002", "integrity constraint at commit"),
        ] {
            assert!(!is_transient_sqlstate(code), "{what} ({code})");
        }
        // Lower case and odd input do not panic.
        assert!(is_transient_sqlstate("57p01"));
        assert!(!is_transient_sqlstate(""));
        assert!(!is_transient_sqlstate("é"));
    }

    /// A database error as a driver reports it: a message and a SQLSTATE.
    #[derive(Debug)]
    struct FakeDatabaseError(Option<&'static str>);

    impl std::fmt::Display for FakeDatabaseError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fake error {:?}", self.0)
        }
    }

    impl std::error::Error for FakeDatabaseError {}

    impl sqlx::error::DatabaseError for FakeDatabaseError {
        fn message(&self) -> &str {
            "fake"
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            self.0.map(Cow::Borrowed)
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn database(code: Option<&'static str>) -> sqlx::Error {
        sqlx::Error::Database(Box::new(FakeDatabaseError(code)))
    }

    fn unavailable(error: sqlx::Error) -> bool {
        let converted = StoreError::from(error);
        assert!(
            matches!(
                converted,
                StoreError::Unavailable(_) | StoreError::Refused(_)
            ),
            "{converted:?}"
        );
        matches!(converted, StoreError::Unavailable(_))
    }

    #[test]
    fn database_errors_convert_by_their_sqlstate() {
        for code in POSTGRES_15_SQLSTATES {
            assert_eq!(
                unavailable(database(Some(code))),
                TRANSIENT.contains(code),
                "{code}"
            );
        }
        // A database error without a code says nothing about being transient.
        assert!(!unavailable(database(None)));
        let message = StoreError::from(database(Some("55P03"))).to_string();
        assert!(message.contains("fake error"), "{message}");
    }

    #[test]
    fn errors_outside_the_database_convert_by_what_they_are_about() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        for (error, what) in [
            (sqlx::Error::Io(io()), "io"),
            (sqlx::Error::Tls(Box::new(io())), "tls"),
            (sqlx::Error::Protocol("garbled".into()), "protocol"),
            (sqlx::Error::PoolTimedOut, "pool timed out"),
            (sqlx::Error::PoolClosed, "pool closed"),
            (sqlx::Error::WorkerCrashed, "worker crashed"),
            (sqlx::Error::Configuration(Box::new(io())), "configuration"),
            (sqlx::Error::BeginFailed, "begin failed"),
            (sqlx::Error::InvalidSavePointStatement, "savepoint"),
        ] {
            assert!(unavailable(error), "{what}");
        }
        for (error, what) in [
            (sqlx::Error::Decode(Box::new(io())), "decode"),
            (sqlx::Error::Encode(Box::new(io())), "encode"),
            (
                sqlx::Error::ColumnDecode {
                    index: "0".into(),
                    source: Box::new(io()),
                },
                "column decode",
            ),
            (
                sqlx::Error::TypeNotFound {
                    type_name: "t".into(),
                },
                "type not found",
            ),
            (sqlx::Error::ColumnNotFound("c".into()), "column not found"),
            (
                sqlx::Error::ColumnIndexOutOfBounds { index: 3, len: 2 },
                "column index",
            ),
            (sqlx::Error::InvalidArgument("x".into()), "invalid argument"),
            (sqlx::Error::RowNotFound, "row not found"),
        ] {
            assert!(!unavailable(error), "{what}");
        }
    }
}
