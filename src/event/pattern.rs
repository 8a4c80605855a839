//! Type patterns (`TRAINING_*`, `training.*`) matched against canonical
//! type names.

use super::*;

/// A type pattern matched against canonical names. Patterns are normalized like
/// names (so `training.*` equals `TRAINING_*`); `*` matches any run, `?` one character.
#[derive(Clone, Debug)]
pub struct TypePattern {
    text: String,
    matcher: wildmatch::WildMatch,
    /// Catalog names the pattern matches through one of their aliases
    /// (`CLUSTER_*` matches HOST_ONLINE, alias CLUSTER_NODE_JOINED).
    by_alias: Vec<&'static str>,
}

impl TypePattern {
    pub fn parse(raw: &str) -> Result<Self, EventError> {
        let bad = || EventError::BadType(raw.chars().take(MAX_TYPE_LEN + 8).collect());
        let s = raw.trim();
        if s.is_empty() || s.len() > MAX_TYPE_LEN {
            return Err(bad());
        }
        if !s.contains(['*', '?']) {
            let text = normalize_type(s)?;
            return Ok(Self {
                matcher: wildmatch::WildMatch::new(&text),
                text,
                by_alias: Vec::new(),
            });
        }
        let mut text = String::with_capacity(s.len());
        for c in s.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '*' | '?' => text.push(c.to_ascii_uppercase()),
                '_' | '.' | '-' => text.push('_'),
                _ => return Err(bad()),
            }
        }
        let matcher = wildmatch::WildMatch::new(&text);
        let by_alias = CATALOG
            .iter()
            .filter(|t| !matcher.matches(t.name) && t.aliases.iter().any(|a| matcher.matches(a)))
            .map(|t| t.name)
            .collect();
        Ok(Self {
            matcher,
            text,
            by_alias,
        })
    }

    /// Whether the canonical name, or one of its catalog aliases, matches.
    pub fn matches(&self, canonical: &str) -> bool {
        self.matcher.matches(canonical) || self.by_alias.contains(&canonical)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// True when `patterns` is empty or any of them matches.
pub fn matches_any(patterns: &[TypePattern], canonical: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(canonical))
}
