-- Fencing for active/standby projectors: the lease token of the replica that last claimed
-- the projection. A batch commits only if its token is at least this one, checked in the
-- batch's own checkpoint statement, so a replica that lost its lease (paused, partitioned)
-- cannot write after another has claimed the projection.
ALTER TABLE projection_checkpoints ADD COLUMN IF NOT EXISTS fence bigint NOT NULL DEFAULT 0;
