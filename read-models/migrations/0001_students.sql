-- Students read model, fed by the `students` projection from the student subjects.

CREATE TABLE students (
    id          uuid PRIMARY KEY,
    name        text        NOT NULL,
    first_name  text        NOT NULL,
    last_name   text        NOT NULL,
    -- Stream sequence of the last event applied to this student: its version and ETag.
    version     bigint      NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE student_courses (
    student_id  uuid        NOT NULL REFERENCES students (id) ON DELETE CASCADE,
    course_id   uuid        NOT NULL,
    enrolled_at timestamptz NOT NULL,
    PRIMARY KEY (student_id, course_id)
);

CREATE INDEX student_courses_by_course ON student_courses (course_id);

-- Last stream sequence each projection has applied, written in the same transaction as
-- the data it covers: the exactly-once-in-effect guard.
CREATE TABLE projection_checkpoints (
    projection    text   PRIMARY KEY,
    last_sequence bigint NOT NULL
);
