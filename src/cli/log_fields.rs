//! Text logs: a span field recorded again replaces its value.
//!
//! tracing-subscriber's text format appends a re-recorded span field, so a
//! connection's `Connection closed` line would name `sector_ids` (recorded
//! at admission, again at the close, "as they are now") twice. The JSON
//! format already keeps only the latest value; this gives text the same.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, FormatFields, Writer};

/// [`DefaultFields`], except that [`FormatFields::add_fields`] replaces the
/// value of a field the span already shows.
#[derive(Debug, Default)]
pub struct ReplacingFields(DefaultFields);

impl<'w> FormatFields<'w> for ReplacingFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        self.0.format_fields(writer, fields)
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // Each new field is rendered alone, through `current`'s own writer
        // (so with its colours), then put in place of its old rendering.
        let shown = std::mem::take(&mut current.fields);
        let mut each = EachField {
            scratch: current,
            rendered: Vec::new(),
        };
        fields.record(&mut each);
        let rendered = each.rendered;
        current.fields = shown;
        for segment in rendered {
            replace_or_append(&mut current.fields, &segment);
        }
        Ok(())
    }
}

/// Renders each field of a record on its own, as [`DefaultFields`] would.
struct EachField<'a> {
    scratch: &'a mut FormattedFields<ReplacingFields>,
    rendered: Vec<String>,
}

impl Visit for EachField<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        DefaultVisitor::new(self.scratch.as_writer(), true).record_debug(field, value);
        self.rendered.push(std::mem::take(&mut self.scratch.fields));
    }
}

/// Puts `segment` (`key=value`, perhaps with colour codes) in place of the
/// segment of the same key in `shown`, or at its end.
fn replace_or_append(shown: &mut String, segment: &str) {
    let Some(key) = key_of(segment) else {
        return;
    };
    // Segment by segment, so that a quoted value holding ` key=` is not
    // taken for a segment.
    let mut start = 0;
    while start < shown.len() {
        let len = segment_len(&shown[start..]);
        if shown[start..].starts_with(key) {
            shown.replace_range(start..start + len, segment);
            return;
        }
        start += len + 1;
    }
    if !shown.is_empty() {
        shown.push(' ');
    }
    shown.push_str(segment);
}

/// The `key=` part of a segment, with its colour codes.
fn key_of(segment: &str) -> Option<&str> {
    let eq = segment.find('=')? + 1;
    let reset = "\x1b[0m";
    let end = if segment[eq..].starts_with(reset) {
        eq + reset.len()
    } else {
        eq
    };
    Some(&segment[..end])
}

/// The length of the segment at the start of `rest`: up to the first space
/// outside quotes (Debug strings, with `\"` escapes) and brackets (Debug
/// lists and structs), skipping colour codes.
fn segment_len(rest: &str) -> usize {
    let (mut depth, mut quoted, mut escaped, mut colour) = (0usize, false, false, false);
    for (i, c) in rest.char_indices() {
        if colour {
            colour = c != 'm';
        } else if c == '\x1b' {
            colour = true;
        } else if quoted {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => {}
            }
        } else {
            match c {
                '"' => quoted = true,
                '[' | '{' | '(' => depth += 1,
                ']' | '}' | ')' => depth = depth.saturating_sub(1),
                ' ' if depth == 0 => return i,
                _ => {}
            }
        }
    }
    rest.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_recorded_again_replaces_its_value() {
        let mut shown =
            r#"endpoint="waiter" origin="a \" b=c" branches=[5] sector_ids="null" id=1"#
                .to_string();
        replace_or_append(&mut shown, r#"sector_ids="[11,12]""#);
        replace_or_append(&mut shown, "branches=[5, 6]");
        replace_or_append(&mut shown, "session=3");
        assert_eq!(
            shown,
            r#"endpoint="waiter" origin="a \" b=c" branches=[5, 6] sector_ids="[11,12]" id=1 session=3"#
        );
        replace_or_append(&mut shown, r#"endpoint="diner""#);
        replace_or_append(&mut shown, "id=2");
        assert!(shown.starts_with(r#"endpoint="diner" origin"#), "{shown}");
        assert!(shown.contains(" id=2 session=3"), "{shown}");
    }

    #[test]
    fn colour_codes_are_part_of_the_key_and_skipped_in_values() {
        let seg = |k: &str, v: &str| format!("\x1b[3m{k}\x1b[0m\x1b[2m=\x1b[0m{v}");
        let mut shown = format!("{} {}", seg("sector_ids", "\"[10]\""), seg("id", "1"));
        replace_or_append(&mut shown, &seg("sector_ids", "\"[11]\""));
        assert_eq!(
            shown,
            format!("{} {}", seg("sector_ids", "\"[11]\""), seg("id", "1"))
        );
    }
}
