//! The batched students projection (one fold, a few set-based statements per batch) must
//! leave exactly what applying the same events one per transaction leaves, for any mix of
//! events and any batch boundaries. Random histories over a few students and courses make
//! the interesting collisions (re-registration, enrollments into deleted students, …)
//! frequent. Real Postgres; the two runs write two generations of the same database.

use events::{AggregateKind, Enrollment, Event, EventMetadata, EventPayload, StudentDetails};
use read_models::PgStudents;
use read_models::generation::{Generation, STUDENTS};
use test_support::TestDatabase;
use uuid::Uuid;

/// A small deterministic generator (no dependency, reproducible from the seed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn history(seed: u64, length: usize) -> Vec<(u64, Event)> {
    let mut rng = Lcg(seed);
    let students: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let courses: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let base = chrono::Utc::now();
    (0..length)
        .map(|i| {
            let student = students[rng.below(6) as usize];
            let course = courses[rng.below(4) as usize];
            let details = StudentDetails {
                name: format!("Name {}", rng.below(100)),
                first_name: "First".into(),
                last_name: "Last".into(),
            };
            let enrollment = Enrollment {
                student_id: student,
                course_id: course,
            };
            let payload = match rng.below(10) {
                0 | 1 => EventPayload::StudentRegistered(details),
                2 => EventPayload::StudentUpdated(details),
                3 => EventPayload::StudentDeleted,
                4..=6 => EventPayload::StudentEnrolled(enrollment),
                _ => EventPayload::StudentUnenrolled(enrollment),
            };
            let event = Event {
                metadata: EventMetadata {
                    event_id: Uuid::now_v7(),
                    aggregate_kind: AggregateKind::Student,
                    aggregate_id: student,
                    occurred_at: base + chrono::Duration::milliseconds(i as i64),
                    correlation_id: Uuid::nil(),
                    causation_id: Uuid::nil(),
                    trace: Default::default(),
                },
                payload,
            };
            (i as u64 + 1, event)
        })
        .collect()
}

/// Every row, with timestamps, in a comparable form.
async fn contents(store: &PgStudents, generation: Generation) -> Vec<String> {
    let sql = format!(
        "SELECT concat_ws('|', s.id, s.name, s.version, s.created_at, s.updated_at,
                (SELECT string_agg(course_id::text || '@' || enrolled_at::text, ',' ORDER BY course_id)
                 FROM {} e WHERE e.student_id = s.id))
         FROM {} s ORDER BY s.id",
        generation.table("student_courses"),
        generation.table("students")
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(store.pool())
        .await
        .expect("contents")
}

#[tokio::test]
async fn batches_of_any_size_leave_what_one_event_per_transaction_leaves() {
    let db = TestDatabase::create().await;
    let live = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    for seed in 1..=6u64 {
        sqlx::query("TRUNCATE students CASCADE")
            .execute(&db.pool)
            .await
            .expect("truncate");
        sqlx::query("DELETE FROM projection_checkpoints")
            .execute(&db.pool)
            .await
            .expect("reset");
        STUDENTS.drop_next(&db.pool).await.expect("drop");
        STUDENTS.prepare_next(&db.pool).await.expect("next tables");
        let one_by_one = live.generation(Generation::Next);

        let events = history(seed, 400);
        for event in &events {
            one_by_one
                .apply_batch(std::slice::from_ref(event), event.0)
                .await
                .expect("one event");
        }
        let mut rng = Lcg(seed * 7919);
        let mut rest = events.as_slice();
        while !rest.is_empty() {
            let size = (1 + rng.below(60) as usize).min(rest.len());
            let (batch, tail) = rest.split_at(size);
            live.apply_batch(batch, batch[batch.len() - 1].0)
                .await
                .expect("batch");
            rest = tail;
        }
        // Re-delivering everything changes nothing.
        live.apply_batch(&events, events.len() as u64)
            .await
            .expect("redelivery");

        let batched = contents(&live, Generation::Live).await;
        assert!(!batched.is_empty(), "seed {seed}: some students survive");
        assert_eq!(
            batched,
            contents(&live, Generation::Next).await,
            "seed {seed}"
        );
    }
    db.cleanup().await;
}
