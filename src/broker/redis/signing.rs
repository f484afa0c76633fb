//! Signatures of the numbered messages the function library publishes.
//!
//! Redis applies the caller's ACL to a function's commands, so whoever may
//! call `wsgateway_publish` may also `PUBLISH` where it publishes. What
//! makes a message the function's is therefore not its channel but its
//! signature: HMAC-SHA1 (the hash Redis's Lua offers, `redis.sha1hex`) of
//! `<channel>\n<number>\n<channels>\n<frame>`, with a key that only the
//! gateway nodes and the loaded library hold. The key is derived from
//! `TABLE_TOKEN_SECRET` (which every node of a deployment shares) and the
//! deployment's prefix; the library carries it in its source, which a user
//! without `FUNCTION` rights cannot read.

use ring::hmac;

/// The key that signs and checks the function's messages.
#[derive(Clone)]
pub struct ChannelKey {
    /// The HMAC-SHA1 key as the library holds it: 64 hex digits (one SHA-1
    /// block, so HMAC uses it as is).
    hex: String,
    key: hmac::Key,
}

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelKey(..)")
    }
}

impl ChannelKey {
    /// The key of the deployment whose nodes share `secret`, under
    /// `prefix` (its key prefix, `staging:` or empty).
    pub fn derive(secret: &str, prefix: &str) -> ChannelKey {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let label = format!("wsgateway redis channel key v1 {prefix}");
        let tag = hmac::sign(&root, label.as_bytes());
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, hex.as_bytes());
        ChannelKey { hex, key }
    }

    /// The key as the library's source holds it.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The signature (40 hex digits) of a message published on `channel`
    /// (its full name), as the library makes it.
    pub fn sign(&self, channel: &str, number: &str, channels: &str, frame: &str) -> String {
        self.tag(channel, number, channels, frame)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn tag(&self, channel: &str, number: &str, channels: &str, frame: &str) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [channel, "\n", number, "\n", channels, "\n", frame] {
            ctx.update(part.as_bytes());
        }
        ctx.sign()
    }

    /// Whether `signature` (40 hex digits) signs this message as it arrived
    /// on `channel` (its full name). Constant time in the signature.
    pub fn verify(
        &self,
        channel: &str,
        number: &str,
        channels: &str,
        frame: &str,
        signature: &str,
    ) -> bool {
        let Some(signature) = unhex(signature) else {
            return false;
        };
        let tag = self.tag(channel, number, channels, frame);
        subtle::ConstantTimeEq::ct_eq(tag.as_ref(), signature.as_slice()).into()
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 40 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_what_hmac_sha1_signs_and_nothing_else() {
        let key = ChannelKey::derive("secret", "");
        assert_eq!(key.hex().len(), 64);
        // HMAC-SHA1 over the same text, computed independently.
        let expected = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key.hex().as_bytes()),
            b"c\n1\nchannel:tenant:staff\n{}",
        );
        let hex: String = expected
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(key.verify("c", "1", "channel:tenant:staff", "{}", &hex));
        assert_eq!(key.sign("c", "1", "channel:tenant:staff", "{}"), hex);
        assert!(!key.verify("d", "1", "channel:tenant:staff", "{}", &hex));
        assert!(!key.verify("c", "2", "channel:tenant:staff", "{}", &hex));
        assert!(!key.verify("c", "1", "channel:tenant:staff", "{ }", &hex));
        assert!(!key.verify("c", "1", "channel:tenant:staff", "{}", "00"));
        assert!(!key.verify("c", "1", "channel:tenant:staff", "{}", &"zz".repeat(20)));
        assert_ne!(
            ChannelKey::derive("secret", "staging:").hex(),
            key.hex(),
            "each prefix its own key"
        );
        assert_ne!(ChannelKey::derive("other", "").hex(), key.hex());
    }
}
