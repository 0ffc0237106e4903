// The outbox table comes from the runtime, so every service's outbox is the same shape.
pub fn migration() -> String {
    keyshare_runtime::mail::outbox_ddl("invitation")
}
