-- Courses read model on Postgres: one JSONB document per course, the local default of the
-- course-store port (MongoDB is the other adapter, with the same document shape).

CREATE TABLE course_documents (
    id       uuid   PRIMARY KEY,
    -- {"id", "name", "description", "discipline", "teacher", "student_ids": [...], "version"}
    document jsonb  NOT NULL,
    -- Stream sequence of the last event applied to this course (its ETag).
    version  bigint NOT NULL
);
