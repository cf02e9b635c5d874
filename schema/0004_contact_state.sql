-- 0004_contact_state: the state that messages, feedback and schedules are built on.
-- * contacts.attributes: custom fields for merge tags (a flat JSON object).
-- * contacts.suppressed_*: a contact suppressed after a hard bounce, repeated soft bounces
--   or a complaint is not mailable, exactly like an unsubscribed one.
-- * contact_events: every unsubscribe, resubscribe, suppression and unsuppression of a
--   contact, appended, with where it came from and who did it: readable by DBAs.
-- * broadcast_recipients.delivered_at/bounced_at/complained_at: delivery feedback
--   annotates a row; it is not a dispatch state.
-- * broadcasts: 'scheduled' status with scheduled_at and an optional latest start
--   (not_after); feedback counters (delivered, bounced, complained), changed in the same
--   transaction as the rows they count; a priority within the account (1-10).
-- Every column added here is nullable or has a constant default: instant on big tables.

ALTER TABLE contacts
    ADD COLUMN attributes        jsonb       NOT NULL DEFAULT '{}',
    ADD COLUMN suppressed_at     timestamptz,
    ADD COLUMN suppressed_reason text,
    ADD COLUMN suppressed_detail text,
    ADD COLUMN soft_bounces      integer     NOT NULL DEFAULT 0,
    ADD CONSTRAINT contacts_attributes_check CHECK (jsonb_typeof(attributes) = 'object'),
    ADD CONSTRAINT contacts_suppressed_reason_check
        CHECK (suppressed_reason IN ('bounce', 'soft_bounce', 'complaint')),
    ADD CONSTRAINT contacts_suppressed_check
        CHECK ((suppressed_at IS NULL) = (suppressed_reason IS NULL));
CREATE INDEX contacts_suppressed ON contacts (account, suppressed_at)
    WHERE suppressed_at IS NOT NULL;

CREATE TABLE contact_events (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account      text        NOT NULL,
    contact_id   bigint      NOT NULL,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    action       text        NOT NULL
        CHECK (action IN ('unsubscribe', 'resubscribe', 'suppress', 'unsuppress',
                          'soft_bounce', 'erase')),
    -- where it came from: one-click, api, cli, import, ses, sql
    source       text        NOT NULL CHECK (source <> ''),
    -- who: {"via": "api", "sub": ...}, {"via": "cli", "user": ..., "host": ...}, ...
    actor        jsonb       NOT NULL DEFAULT '{}',
    broadcast_id uuid,
    details      jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX contact_events_contact ON contact_events (account, contact_id, at);

ALTER TABLE broadcast_recipients
    ADD COLUMN delivered_at  timestamptz,
    ADD COLUMN bounced_at    timestamptz,
    ADD COLUMN complained_at timestamptz;

ALTER TABLE broadcasts DROP CONSTRAINT broadcasts_status_check;
ALTER TABLE broadcasts
    ADD CONSTRAINT broadcasts_status_check
        CHECK (status IN ('draft', 'scheduled', 'sending', 'paused', 'sent', 'failed',
                          'cancelled')),
    ADD COLUMN scheduled_at timestamptz,
    ADD COLUMN not_after    timestamptz,
    ADD COLUMN delivered    integer  NOT NULL DEFAULT 0,
    ADD COLUMN bounced      integer  NOT NULL DEFAULT 0,
    ADD COLUMN complained   integer  NOT NULL DEFAULT 0,
    ADD COLUMN priority     smallint NOT NULL DEFAULT 1,
    ADD CONSTRAINT broadcasts_priority_check CHECK (priority BETWEEN 1 AND 10),
    ADD CONSTRAINT broadcasts_scheduled_check
        CHECK (status <> 'scheduled' OR scheduled_at IS NOT NULL),
    ADD CONSTRAINT broadcasts_not_after_check
        CHECK (not_after IS NULL OR scheduled_at IS NULL OR not_after >= scheduled_at);
-- the scheduled broadcasts whose time has come, in time order: O(due) for the sweeper
CREATE INDEX broadcasts_scheduled ON broadcasts (scheduled_at) WHERE status = 'scheduled';

CREATE OR REPLACE VIEW broadcast_progress AS
SELECT id AS broadcast_id,
       account,
       status,
       total,
       total - sent - failed - skipped - unknown - cancelled AS pending,
       sent,
       failed,
       skipped,
       unknown,
       cancelled,
       epoch,
       paused_reason,
       created_at,
       started_at,
       finished_at,
       scheduled_at,
       delivered,
       bounced,
       complained
FROM broadcasts;
