-- Least privilege for the read side: query-api connects as a login role that is a member of
-- `school_reader`, which may read the read models and nothing else. The projectors (and
-- stream-admin's replay) connect as the owner of these tables.
--
-- Roles belong to the whole cluster and creating one needs CREATEROLE. A migrating user
-- without it relies on an operator (or the chart) having created `school_reader`; if
-- nobody has, the grants are skipped with a notice rather than failing the migration.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'school_reader') THEN
        BEGIN
            CREATE ROLE school_reader NOLOGIN;
        EXCEPTION
            -- Another database of the cluster migrating at the same moment created it.
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'role school_reader does not exist and this user may not create it: grant query-api''s role SELECT on the read models by hand';
                RETURN;
        END;
    END IF;
    GRANT USAGE ON SCHEMA public TO school_reader;
    GRANT SELECT ON students, student_courses, course_documents, projection_checkpoints
        TO school_reader;
    -- The next generation a replay builds (and then renames into place) is created by the
    -- same owner, so it is readable the moment it is switched in.
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO school_reader;
END
$$;
