-- 0006: who started each automatic provisioning run (SPEC §12, §15: the Provisioning page shows the last runs
-- "by whom or the schedule"). Append-only: never edit once released. (0005 is reserved for the resync task.)
-- The schedule records 'automatic-provisioning', an administrator their login or admin token name, the CLI
-- 'cli:<user>'; runs recorded before this migration have '' (unknown).
ALTER TABLE automatic_runs ADD COLUMN actor text NOT NULL DEFAULT '';
