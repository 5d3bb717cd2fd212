-- Runs once, when the volume is initialised: query-api's login, a member of school_reader,
-- which the projectors' migrations grant SELECT on the read models and nothing else.
-- (The chart does the same with a generated password: charts/school/templates/postgresql.yaml.)
CREATE ROLE school_reader NOLOGIN;
CREATE ROLE school_query LOGIN PASSWORD 'school_query' IN ROLE school_reader;
