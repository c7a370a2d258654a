-- Demo rows: user 123 of the scenario, in team 5 and chat room 42.
INSERT INTO users (id, name, email, avatar_url)
VALUES (123, 'Ada', 'ada@example.com', 'https://img.example.com/ada-1.png')
ON CONFLICT (id) DO NOTHING;
INSERT INTO teams (id, name) VALUES (5, 'Platform') ON CONFLICT (id) DO NOTHING;
INSERT INTO team_members (team_id, user_id) VALUES (5, 123) ON CONFLICT DO NOTHING;
INSERT INTO chat_rooms (id, title) VALUES (42, 'general') ON CONFLICT (id) DO NOTHING;
INSERT INTO chat_participants (room_id, user_id) VALUES (42, 123) ON CONFLICT DO NOTHING;
INSERT INTO authors (id, name) VALUES (1, 'Grace'), (2, 'Linus') ON CONFLICT (id) DO NOTHING;
INSERT INTO posts (id, author_id, title) VALUES (7, 1, 'Cache invalidation') ON CONFLICT (id) DO NOTHING;
SELECT setval('users_id_seq', GREATEST((SELECT max(id) FROM users), 1));
SELECT setval('teams_id_seq', GREATEST((SELECT max(id) FROM teams), 1));
SELECT setval('chat_rooms_id_seq', GREATEST((SELECT max(id) FROM chat_rooms), 1));
SELECT setval('authors_id_seq', GREATEST((SELECT max(id) FROM authors), 1));
SELECT setval('posts_id_seq', GREATEST((SELECT max(id) FROM posts), 1));
