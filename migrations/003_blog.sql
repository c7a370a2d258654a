-- The lesson's blog exercise: authors and their posts. A post can move between
-- authors, so the posts rule needs the old author_id (REPLICA IDENTITY FULL,
-- set by `cache-invalidator setup --replica-identity-full`).
CREATE TABLE IF NOT EXISTS authors (
    id    bigserial PRIMARY KEY,
    name  text NOT NULL,
    bio   text
);

CREATE TABLE IF NOT EXISTS posts (
    id          bigserial PRIMARY KEY,
    author_id   bigint NOT NULL REFERENCES authors(id),
    title       text NOT NULL,
    body        text NOT NULL DEFAULT '',
    published   boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
