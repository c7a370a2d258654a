-- Chat rooms and their participants (the scenario's chat:room:<id>:participants list).
CREATE TABLE IF NOT EXISTS chat_rooms (
    id     bigserial PRIMARY KEY,
    title  text NOT NULL
);

CREATE TABLE IF NOT EXISTS chat_participants (
    room_id  bigint NOT NULL REFERENCES chat_rooms(id) ON DELETE CASCADE,
    user_id  bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    joined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, user_id)
);
