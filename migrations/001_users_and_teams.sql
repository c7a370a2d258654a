-- The lesson's profile-picture scenario: a user's picture appears in their
-- profile, their avatar, their teams' member lists and their chat rooms'
-- participant lists.
CREATE TABLE IF NOT EXISTS users (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL UNIQUE,
    avatar_url  text,
    settings    jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS teams (
    id    bigserial PRIMARY KEY,
    name  text NOT NULL
);

CREATE TABLE IF NOT EXISTS team_members (
    team_id  bigint NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    user_id  bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role     text NOT NULL DEFAULT 'member',
    PRIMARY KEY (team_id, user_id)
);
