//! Resource names (AIP-122) whose variable segments are UUIDs, as every Keyshare API names its
//! resources: `projects/{project}/keys/{key}`.

use uuid::Uuid;

/// The UUIDs in the `*` positions of `raw`, if it has the shape of `pattern` (such as
/// `["projects", "*", "keys", "*"]`). Only the lowercase hyphenated 36-character form, the one
/// the services write, is accepted, so each resource has exactly one name.
pub fn uuids(raw: &str, pattern: &[&str]) -> Option<Vec<Uuid>> {
    let parts: Vec<&str> = raw.split('/').collect();
    if parts.len() != pattern.len() {
        return None;
    }
    let mut ids = Vec::new();
    for (part, expected) in parts.iter().zip(pattern) {
        if *expected == "*" {
            let canonical = part.len() == 36 && !part.bytes().any(|b| b.is_ascii_uppercase());
            ids.push(Uuid::parse_str(part).ok().filter(|_| canonical)?);
        } else if part != expected {
            return None;
        }
    }
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_their_pattern_only() {
        let id = "0193f7e2-0000-7000-8000-000000000001";
        let key = "0193f7e2-0000-7000-8000-000000000002";
        let pattern = ["projects", "*", "keys", "*"];
        assert_eq!(
            uuids(&format!("projects/{id}/keys/{key}"), &pattern),
            Some(vec![Uuid::parse_str(id).unwrap(), Uuid::parse_str(key).unwrap()])
        );
        for bad in [
            format!("projects/{id}"),
            format!("projects/{id}/keys/{key}/x"),
            format!("project/{id}/keys/{key}"),
            format!("projects/{}/keys/{key}", id.replace('-', "")),
            format!("projects/{id}/keys/nope"),
            // Found by the resource_name fuzz target: a second name for the same key.
            format!("projects/{}/keys/{key}", id.to_uppercase()),
            format!("projects/{{{id}}}/keys/{key}"),
            String::new(),
        ] {
            assert_eq!(uuids(&bad, &pattern), None, "{bad}");
        }
    }
}
