//! read-models: every read model the projections keep, one module per store: its schema
//! (migrations, indexes), its writer (`apply_batch` with the checkpoint, fencing,
//! generations for replays, rebuilds for redrives) and its reader. The projectors write
//! through it, query-api reads through it, stream-admin replays and redrives through it;
//! none of them knows a table or a collection by name.

pub mod course_document;
pub mod course_store;
pub mod generation;
pub mod mongo_courses;
pub mod mongo_generations;
pub mod pg_courses;
pub mod pg_student_reader;
pub mod pg_students;
pub mod rebuild;
pub mod store;
pub mod student_fold;

pub use course_store::CourseStore;
pub use pg_student_reader::{StudentReader, StudentView};
pub use pg_students::PgStudents;
pub use store::{BatchOutcome, ProjectionStore, StoreError};
