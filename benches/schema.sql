-- The benchmark's tables besides migrations/ (users comes from there).
CREATE TABLE IF NOT EXISTS items (
    id        bigint PRIMARY KEY,
    owner_id  int NOT NULL,
    v         int NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS docs (
    id        bigint PRIMARY KEY,
    owner_id  int NOT NULL,
    body      text NOT NULL
);
