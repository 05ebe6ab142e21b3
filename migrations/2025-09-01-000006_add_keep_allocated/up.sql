-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- A thick-provisioned target: zero requests keep its blocks allocated (NBD's
-- NO_HOLE flag) instead of punching holes.
ALTER TABLE vm_disks ADD COLUMN IF NOT EXISTS keep_allocated BOOLEAN NOT NULL DEFAULT FALSE AFTER destination_is_zero;
