-- Runs once, when the volume is initialised: query-api's login, a member of school_reader,
-- which the projectors' migrations grant SELECT on the read models and nothing else; and the
-- projectors' (and stream-admin's) login, no superuser, which may create tables in schema
-- public, so it owns the read models it migrates and a replay's generations, and nothing
-- else. school_reader exists before the first migration: the projectors may not create roles.
-- (The chart does the same with generated passwords: charts/school/templates/postgresql.yaml.)
CREATE ROLE school_reader NOLOGIN;
CREATE ROLE school_query LOGIN PASSWORD 'school_query' IN ROLE school_reader;
CREATE ROLE school_projector LOGIN PASSWORD 'school_projector'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
GRANT USAGE, CREATE ON SCHEMA public TO school_projector;
