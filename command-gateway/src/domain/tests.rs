//! Given/when/then tests of `decide` for every command and every rule, and a property test
//! that random command sequences never break an invariant.

use std::collections::BTreeSet;

use events::{CourseDetails, Enrollment, EventPayload, StudentDetails};
use proptest::prelude::*;
use uuid::Uuid;

use super::decide::{AggregateId, Change, Command, Snapshot, decide};
use super::fields::{MAX_COURSES_PER_STUDENT, MAX_STUDENTS_PER_COURSE};
use super::{CourseDraft, DomainError, StudentDraft};

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn student_details(name: &str) -> StudentDetails {
    StudentDetails {
        name: name.into(),
        first_name: "First".into(),
        last_name: "Last".into(),
    }
}

fn course_details(name: &str) -> CourseDetails {
    CourseDetails {
        name: name.into(),
        description: "A course".into(),
        discipline: "Maths".into(),
        teacher: "Teacher".into(),
    }
}

fn student_draft(name: &str, courses: &[Uuid]) -> StudentDraft {
    let ids: Vec<String> = courses.iter().map(Uuid::to_string).collect();
    StudentDraft::parse(Some(name), Some("First"), Some("Last"), &ids).expect("valid draft")
}

fn course_draft(name: &str, students: &[Uuid]) -> CourseDraft {
    let ids: Vec<String> = students.iter().map(Uuid::to_string).collect();
    CourseDraft::parse(
        Some(name),
        Some("A course"),
        Some("Maths"),
        Some("Teacher"),
        &ids,
    )
    .expect("valid draft")
}

fn registered(student: Uuid) -> Change {
    Change {
        aggregate: AggregateId::student(student),
        payload: EventPayload::StudentRegistered(student_details("Student")),
    }
}

fn created(course: Uuid) -> Change {
    Change {
        aggregate: AggregateId::course(course),
        payload: EventPayload::CourseCreated(course_details("Course")),
    }
}

fn enrollment(student_id: Uuid, course_id: Uuid) -> Enrollment {
    Enrollment {
        student_id,
        course_id,
    }
}

/// Both sides of an enrollment, as the command side appends them.
fn enrolled(student: Uuid, course: Uuid) -> Vec<Change> {
    let payload = EventPayload::StudentEnrolled(enrollment(student, course));
    vec![
        Change {
            aggregate: AggregateId::student(student),
            payload: payload.clone(),
        },
        Change {
            aggregate: AggregateId::course(course),
            payload,
        },
    ]
}

fn unenrolled(student: Uuid, course: Uuid) -> Vec<Change> {
    let payload = EventPayload::StudentUnenrolled(enrollment(student, course));
    vec![
        Change {
            aggregate: AggregateId::student(student),
            payload: payload.clone(),
        },
        Change {
            aggregate: AggregateId::course(course),
            payload,
        },
    ]
}

fn given(history: Vec<Change>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    snapshot.apply(&history);
    snapshot
}

const S: u128 = 1;
const C: u128 = 1000;

// ---- register student

#[test]
fn given_nothing_when_a_student_registers_then_student_registered() {
    let when = Command::RegisterStudent {
        student_id: id(S),
        draft: student_draft("Ada L", &[]),
    };
    assert_eq!(
        decide(&when, &given(vec![])),
        Ok(vec![Change {
            aggregate: AggregateId::student(id(S)),
            payload: EventPayload::StudentRegistered(student_details("Ada L")),
        }])
    );
}

#[test]
fn given_a_course_when_a_student_registers_into_it_then_both_sides_record_the_enrollment() {
    let when = Command::RegisterStudent {
        student_id: id(S),
        draft: student_draft("Ada L", &[id(C)]),
    };
    let changes = decide(&when, &given(vec![created(id(C))])).expect("accepted");
    assert_eq!(changes[1..], enrolled(id(S), id(C))[..]);
}

#[test]
fn given_an_existing_student_when_registered_again_then_already_exists() {
    let when = Command::RegisterStudent {
        student_id: id(S),
        draft: student_draft("Ada L", &[]),
    };
    assert_eq!(
        decide(&when, &given(vec![registered(id(S))])),
        Err(DomainError::AlreadyExists(AggregateId::student(id(S))))
    );
}

#[test]
fn given_no_such_course_when_a_student_registers_into_it_then_unknown_reference() {
    let when = Command::RegisterStudent {
        student_id: id(S),
        draft: student_draft("Ada L", &[id(C)]),
    };
    assert_eq!(
        decide(&when, &given(vec![])),
        Err(DomainError::UnknownReference {
            field: "course_ids",
            id: id(C)
        })
    );
}

/// A course with `MAX_STUDENTS_PER_COURSE` students.
fn full_course(course: Uuid) -> Vec<Change> {
    let mut history = vec![created(course)];
    for n in 0..MAX_STUDENTS_PER_COURSE as u128 {
        history.push(registered(id(100 + n)));
        history.extend(enrolled(id(100 + n), course));
    }
    history
}

/// A student in `MAX_COURSES_PER_STUDENT` courses.
fn busy_student(student: Uuid) -> Vec<Change> {
    let mut history = vec![registered(student)];
    for n in 0..MAX_COURSES_PER_STUDENT as u128 {
        history.push(created(id(5000 + n)));
        history.extend(enrolled(student, id(5000 + n)));
    }
    history
}

#[test]
fn given_a_full_course_when_a_student_registers_into_it_then_course_full() {
    let when = Command::RegisterStudent {
        student_id: id(S),
        draft: student_draft("Ada L", &[id(C)]),
    };
    assert_eq!(
        decide(&when, &given(full_course(id(C)))),
        Err(DomainError::CourseFull { course_id: id(C) })
    );
}

// ---- replace student

#[test]
fn given_no_student_when_replaced_then_not_found() {
    let when = Command::ReplaceStudent {
        student_id: id(S),
        draft: student_draft("Ada L", &[]),
    };
    let deleted = vec![
        registered(id(S)),
        Change {
            aggregate: AggregateId::student(id(S)),
            payload: EventPayload::StudentDeleted,
        },
    ];
    for history in [vec![], deleted] {
        assert_eq!(
            decide(&when, &given(history)),
            Err(DomainError::NotFound(AggregateId::student(id(S))))
        );
    }
}

#[test]
fn given_a_student_when_replaced_with_the_same_content_then_nothing_happens() {
    let when = Command::ReplaceStudent {
        student_id: id(S),
        draft: student_draft("Student", &[id(C)]),
    };
    let mut history = vec![registered(id(S)), created(id(C))];
    history.extend(enrolled(id(S), id(C)));
    assert_eq!(decide(&when, &given(history)), Ok(vec![]));
}

#[test]
fn given_a_student_when_replaced_then_details_update_and_the_course_diff_becomes_enrollments() {
    let (kept, dropped, added) = (id(C), id(C + 1), id(C + 2));
    let mut history = vec![
        registered(id(S)),
        created(kept),
        created(dropped),
        created(added),
    ];
    history.extend(enrolled(id(S), kept));
    history.extend(enrolled(id(S), dropped));
    let when = Command::ReplaceStudent {
        student_id: id(S),
        draft: student_draft("Renamed", &[kept, added]),
    };
    let mut expected = vec![Change {
        aggregate: AggregateId::student(id(S)),
        payload: EventPayload::StudentUpdated(student_details("Renamed")),
    }];
    expected.extend(unenrolled(id(S), dropped));
    expected.extend(enrolled(id(S), added));
    assert_eq!(decide(&when, &given(history)), Ok(expected));
}

#[test]
fn given_a_student_when_replaced_into_a_full_course_then_course_full() {
    let mut history = full_course(id(C));
    history.push(registered(id(S)));
    let when = Command::ReplaceStudent {
        student_id: id(S),
        draft: student_draft("Student", &[id(C)]),
    };
    assert_eq!(
        decide(&when, &given(history)),
        Err(DomainError::CourseFull { course_id: id(C) })
    );
}

// ---- delete student

#[test]
fn given_an_enrolled_student_when_deleted_then_every_course_forgets_it() {
    let mut history = vec![registered(id(S)), created(id(C)), created(id(C + 1))];
    history.extend(enrolled(id(S), id(C)));
    history.extend(enrolled(id(S), id(C + 1)));
    let when = Command::DeleteStudent { student_id: id(S) };
    let changes = decide(&when, &given(history)).expect("accepted");
    assert_eq!(
        changes,
        vec![
            Change {
                aggregate: AggregateId::student(id(S)),
                payload: EventPayload::StudentDeleted
            },
            Change {
                aggregate: AggregateId::course(id(C)),
                payload: EventPayload::StudentUnenrolled(enrollment(id(S), id(C)))
            },
            Change {
                aggregate: AggregateId::course(id(C + 1)),
                payload: EventPayload::StudentUnenrolled(enrollment(id(S), id(C + 1)))
            },
        ]
    );
    let mut after = given(vec![]);
    after.apply(&changes);
}

#[test]
fn given_no_student_when_deleted_then_not_found() {
    assert_eq!(
        decide(
            &Command::DeleteStudent { student_id: id(S) },
            &given(vec![])
        ),
        Err(DomainError::NotFound(AggregateId::student(id(S))))
    );
}

// ---- courses

#[test]
fn given_students_when_a_course_is_created_with_them_then_both_sides_record_it() {
    let when = Command::CreateCourse {
        course_id: id(C),
        draft: course_draft("Algebra", &[id(S)]),
    };
    let changes = decide(&when, &given(vec![registered(id(S))])).expect("accepted");
    assert_eq!(
        changes[0],
        Change {
            aggregate: AggregateId::course(id(C)),
            payload: EventPayload::CourseCreated(course_details("Algebra")),
        }
    );
    assert_eq!(changes[1..], enrolled(id(S), id(C))[..]);
}

#[test]
fn given_an_existing_course_when_created_again_then_already_exists() {
    let when = Command::CreateCourse {
        course_id: id(C),
        draft: course_draft("Algebra", &[]),
    };
    assert_eq!(
        decide(&when, &given(vec![created(id(C))])),
        Err(DomainError::AlreadyExists(AggregateId::course(id(C))))
    );
}

#[test]
fn given_no_such_student_when_a_course_names_it_then_unknown_reference() {
    let when = Command::CreateCourse {
        course_id: id(C),
        draft: course_draft("Algebra", &[id(S)]),
    };
    assert_eq!(
        decide(&when, &given(vec![])),
        Err(DomainError::UnknownReference {
            field: "student_ids",
            id: id(S)
        })
    );
}

#[test]
fn given_a_student_in_15_courses_when_a_course_adds_it_then_student_course_limit() {
    let when = Command::CreateCourse {
        course_id: id(C),
        draft: course_draft("Algebra", &[id(S)]),
    };
    assert_eq!(
        decide(&when, &given(busy_student(id(S)))),
        Err(DomainError::StudentCourseLimit { student_id: id(S) })
    );
    let mut history = busy_student(id(S));
    history.push(created(id(C)));
    let replace = Command::ReplaceCourse {
        course_id: id(C),
        draft: course_draft("Course", &[id(S)]),
    };
    assert_eq!(
        decide(&replace, &given(history)),
        Err(DomainError::StudentCourseLimit { student_id: id(S) })
    );
}

#[test]
fn given_a_course_when_replaced_then_details_update_and_the_student_diff_becomes_enrollments() {
    let (kept, dropped, added) = (id(S), id(S + 1), id(S + 2));
    let mut history = vec![
        created(id(C)),
        registered(kept),
        registered(dropped),
        registered(added),
    ];
    history.extend(enrolled(kept, id(C)));
    history.extend(enrolled(dropped, id(C)));
    let when = Command::ReplaceCourse {
        course_id: id(C),
        draft: course_draft("Geometry", &[kept, added]),
    };
    let mut expected = vec![Change {
        aggregate: AggregateId::course(id(C)),
        payload: EventPayload::CourseUpdated(course_details("Geometry")),
    }];
    expected.extend(unenrolled(dropped, id(C)));
    expected.extend(enrolled(added, id(C)));
    assert_eq!(decide(&when, &given(history)), Ok(expected));
}

#[test]
fn given_no_course_when_replaced_or_deleted_then_not_found() {
    let replace = Command::ReplaceCourse {
        course_id: id(C),
        draft: course_draft("Geometry", &[]),
    };
    let delete = Command::DeleteCourse { course_id: id(C) };
    for when in [replace, delete] {
        assert_eq!(
            decide(&when, &given(vec![])),
            Err(DomainError::NotFound(AggregateId::course(id(C))))
        );
    }
}

#[test]
fn given_a_course_with_students_when_deleted_then_every_student_forgets_it() {
    let mut history = vec![created(id(C)), registered(id(S)), registered(id(S + 1))];
    history.extend(enrolled(id(S), id(C)));
    history.extend(enrolled(id(S + 1), id(C)));
    let changes = decide(
        &Command::DeleteCourse { course_id: id(C) },
        &given(history.clone()),
    )
    .expect("accepted");
    assert_eq!(changes[0].payload, EventPayload::CourseDeleted);
    let mut after = given(history);
    after.apply(&changes);
    for student in [id(S), id(S + 1)] {
        let state = after.student(student).active().expect("still active");
        assert!(state.course_ids.is_empty());
    }
}

// ---- explicit enrollment

#[test]
fn given_a_student_and_a_course_when_enrolled_then_both_sides_record_it() {
    let when = Command::Enroll {
        student_id: id(S),
        course_id: id(C),
    };
    assert_eq!(
        decide(&when, &given(vec![registered(id(S)), created(id(C))])),
        Ok(enrolled(id(S), id(C)))
    );
}

#[test]
fn given_an_enrollment_when_enrolled_again_then_nothing_happens() {
    let mut history = vec![registered(id(S)), created(id(C))];
    history.extend(enrolled(id(S), id(C)));
    let when = Command::Enroll {
        student_id: id(S),
        course_id: id(C),
    };
    assert_eq!(decide(&when, &given(history)), Ok(vec![]));
}

#[test]
fn given_a_missing_or_deleted_side_when_enrolled_then_not_found() {
    let when = Command::Enroll {
        student_id: id(S),
        course_id: id(C),
    };
    assert_eq!(
        decide(&when, &given(vec![created(id(C))])),
        Err(DomainError::NotFound(AggregateId::student(id(S))))
    );
    let deleted_course = vec![
        registered(id(S)),
        created(id(C)),
        Change {
            aggregate: AggregateId::course(id(C)),
            payload: EventPayload::CourseDeleted,
        },
    ];
    assert_eq!(
        decide(&when, &given(deleted_course)),
        Err(DomainError::NotFound(AggregateId::course(id(C))))
    );
}

#[test]
fn given_a_student_in_15_courses_when_enrolled_in_a_16th_then_student_course_limit() {
    let mut history = busy_student(id(S));
    history.push(created(id(C)));
    let when = Command::Enroll {
        student_id: id(S),
        course_id: id(C),
    };
    assert_eq!(
        decide(&when, &given(history)),
        Err(DomainError::StudentCourseLimit { student_id: id(S) })
    );
}

#[test]
fn given_a_course_with_60_students_when_a_61st_enrolls_then_course_full() {
    let mut history = full_course(id(C));
    history.push(registered(id(S)));
    let when = Command::Enroll {
        student_id: id(S),
        course_id: id(C),
    };
    assert_eq!(
        decide(&when, &given(history)),
        Err(DomainError::CourseFull { course_id: id(C) })
    );
}

#[test]
fn given_an_enrollment_when_unenrolled_then_both_sides_record_it() {
    let mut history = vec![registered(id(S)), created(id(C))];
    history.extend(enrolled(id(S), id(C)));
    let when = Command::Unenroll {
        student_id: id(S),
        course_id: id(C),
    };
    assert_eq!(decide(&when, &given(history)), Ok(unenrolled(id(S), id(C))));
}

#[test]
fn given_no_enrollment_when_unenrolled_then_not_enrolled() {
    let when = Command::Unenroll {
        student_id: id(S),
        course_id: id(C),
    };
    assert_eq!(
        decide(&when, &given(vec![registered(id(S)), created(id(C))])),
        Err(DomainError::NotEnrolled {
            student_id: id(S),
            course_id: id(C)
        })
    );
    assert_eq!(
        decide(&when, &given(vec![])),
        Err(DomainError::NotFound(AggregateId::student(id(S))))
    );
}

#[test]
fn related_aggregates_cover_current_and_requested_relations() {
    let mut history = vec![registered(id(S)), created(id(C))];
    history.extend(enrolled(id(S), id(C)));
    let snapshot = given(history);
    let replace = Command::ReplaceStudent {
        student_id: id(S),
        draft: student_draft("Student", &[id(C + 1)]),
    };
    assert_eq!(
        replace.related(&snapshot),
        vec![AggregateId::course(id(C)), AggregateId::course(id(C + 1))]
    );
    assert_eq!(
        Command::DeleteStudent { student_id: id(S) }.related(&snapshot),
        vec![AggregateId::course(id(C))]
    );
}

// ---- invariants under random command sequences

const STUDENTS: u128 = 70;
const COURSES: u128 = 20;

fn arbitrary_command() -> impl Strategy<Value = Command> {
    let student = (0..STUDENTS).prop_map(|n| id(S + n));
    let course = (0..COURSES).prop_map(|n| id(C + n));
    let courses = proptest::collection::btree_set(0..COURSES, 0..=4)
        .prop_map(|set| set.into_iter().map(|n| id(C + n)).collect::<Vec<_>>());
    let students = proptest::collection::btree_set(0..STUDENTS, 0..=8)
        .prop_map(|set| set.into_iter().map(|n| id(S + n)).collect::<Vec<_>>());
    prop_oneof![
        1 => (student.clone(), courses.clone()).prop_map(|(student_id, courses)| Command::RegisterStudent {
            student_id,
            draft: student_draft("Student", &courses),
        }),
        1 => (student.clone(), courses).prop_map(|(student_id, courses)| Command::ReplaceStudent {
            student_id,
            draft: student_draft("Renamed", &courses),
        }),
        1 => student.clone().prop_map(|student_id| Command::DeleteStudent { student_id }),
        1 => (course.clone(), students.clone()).prop_map(|(course_id, students)| Command::CreateCourse {
            course_id,
            draft: course_draft("Course", &students),
        }),
        1 => (course.clone(), students).prop_map(|(course_id, students)| Command::ReplaceCourse {
            course_id,
            draft: course_draft("Renamed", &students),
        }),
        1 => course.clone().prop_map(|course_id| Command::DeleteCourse { course_id }),
        // Enrollments are the commands that hit the limits: weigh them up.
        8 => (student.clone(), course.clone()).prop_map(|(student_id, course_id)| Command::Enroll { student_id, course_id }),
        2 => (student, course).prop_map(|(student_id, course_id)| Command::Unenroll { student_id, course_id }),
    ]
}

fn check_invariants(snapshot: &Snapshot) -> Result<(), TestCaseError> {
    for (student_id, state) in &snapshot.students {
        let Some(student) = state.active() else {
            continue;
        };
        prop_assert!(student.course_ids.len() <= MAX_COURSES_PER_STUDENT);
        for course_id in &student.course_ids {
            let course = snapshot.course(*course_id).active();
            prop_assert!(
                course.is_some(),
                "student {student_id} enrolled in missing course {course_id}"
            );
            prop_assert!(
                course.is_some_and(|c| c.student_ids.contains(student_id)),
                "one-sided enrollment"
            );
        }
    }
    for (course_id, state) in &snapshot.courses {
        let Some(course) = state.active() else {
            continue;
        };
        prop_assert!(course.student_ids.len() <= MAX_STUDENTS_PER_COURSE);
        for student_id in &course.student_ids {
            let student = snapshot.student(*student_id).active();
            prop_assert!(
                student.is_some(),
                "course {course_id} lists missing student {student_id}"
            );
            prop_assert!(
                student.is_some_and(|s| s.course_ids.contains(course_id)),
                "one-sided enrollment"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_command_sequences_never_break_an_invariant(
        commands in proptest::collection::vec(arbitrary_command(), 1..400)
    ) {
        let mut snapshot = Snapshot::default();
        for command in &commands {
            if let Ok(changes) = decide(command, &snapshot) {
                // Every change targets an aggregate the decision was allowed to read.
                let readable: BTreeSet<AggregateId> = command
                    .related(&snapshot)
                    .into_iter()
                    .chain([command.target()])
                    .collect();
                for change in &changes {
                    prop_assert!(readable.contains(&change.aggregate), "{command:?} wrote {:?}", change.aggregate);
                }
                snapshot.apply(&changes);
            }
            check_invariants(&snapshot)?;
        }
    }
}
