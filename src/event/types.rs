//! The type catalog with its categories and aliases, normalization of
//! type names, and what a local process may name (typo detection).

use super::*;

/// One entry of the type catalog.
pub struct KnownType {
    pub name: &'static str,
    pub category: &'static str,
    pub aliases: &'static [&'static str],
    pub description: &'static str,
}

macro_rules! catalog {
    ($( $cat:literal : [ $( $name:literal $( | $alias:literal )* => $desc:literal ),* $(,)? ] ),* $(,)?) => {
        pub const CATALOG: &[KnownType] = &[
            $( $( KnownType { name: $name, category: $cat, aliases: &[$($alias),*], description: $desc }, )* )*
        ];
    };
}

// Aliases are listed in normalized form (upper case, '_' separators); the dotted
// and lower-case spellings of every name and alias are accepted by normalization.
catalog! {
    "selfplay": [
        "SELFPLAY_STARTED" => "a selfplay worker started generating games",
        "SELFPLAY_COMPLETED" | "SELFPLAY_COMPLETE" | "SELFPLAY_DONE" => "a selfplay run finished",
        "SELFPLAY_FAILED" => "a selfplay run failed",
        "NEW_GAMES_AVAILABLE" | "NEW_GAMES" => "fresh games are ready to be synced",
    ],
    "sync": [
        "DATA_SYNC_STARTED" | "SYNC_STARTED" => "a data sync began",
        "DATA_SYNC_COMPLETED" | "DATA_SYNC_COMPLETE" | "SYNC_COMPLETE" | "SYNC_COMPLETED" => "a data sync finished (a wanted blob arrived and was placed)",
        "DATA_SYNC_FAILED" | "SYNC_FAILED" => "a data sync failed (a wanted blob could not be fetched or placed)",
        "DATA_SYNC_TRIGGERED" => "a data sync was asked for",
        "ORPHAN_GAMES_DETECTED" => "games were found that no sync has picked up",
        "REPAIR_COMPLETED" | "REPAIR_COMPLETE" => "a repair of damaged data finished",
        "REPAIR_FAILED" => "a repair of damaged data failed",
        "GAME_BATCH_READY" => "a batch of games was published as a blob",
        "BLOB_PUBLISHED" => "a name now points at a blob",
        "BLOB_FORGOTTEN" => "a name was retracted: it points at no blob, and no host fetches it any more",
    ],
    "export": [
        "NPZ_EXPORT_STARTED" | "EXPORT_STARTED" => "training arrays export began",
        "NPZ_EXPORT_COMPLETED" | "NPZ_EXPORT_COMPLETE" | "EXPORT_COMPLETE" | "EXPORT_COMPLETED" => "training arrays are ready",
        "NPZ_EXPORT_FAILED" | "EXPORT_FAILED" => "training arrays export failed",
    ],
    "training": [
        "TRAINING_STARTED" | "TRAINING_START" => "a training run began",
        "TRAINING_PROGRESS" => "a training run reports progress",
        "TRAINING_COMPLETED" | "TRAINING_COMPLETE" | "TRAINING_DONE" | "TRAINING_FINISHED" => "a training run produced a model",
        "TRAINING_FAILED" => "a training run failed",
        "TRAINING_EARLY_STOPPED" => "a training run stopped early (no more improvement)",
        "HYPERPARAMETER_UPDATED" => "training hyperparameters were adjusted",
        "ADAPTIVE_PARAMS_CHANGED" => "adaptive training parameters changed in real time",
    ],
    "evaluation": [
        "EVALUATION_STARTED" | "EVAL_STARTED" => "an evaluation began",
        "EVALUATION_COMPLETED" | "EVALUATION_COMPLETE" | "EVAL_COMPLETED" | "EVAL_COMPLETE" => "an evaluation finished with results",
        "EVALUATION_FAILED" | "EVAL_FAILED" => "an evaluation failed",
        "EVALUATION_PROGRESS" | "EVAL_PROGRESS" => "an evaluation reports progress",
        "EVALUATION_RESULT" | "EVAL_RESULT" => "an Elo evaluation produced its result",
        "ELO_UPDATED" => "a model's Elo rating changed",
        "ELO_SIGNIFICANT_CHANGE" => "a model's Elo moved by more than its threshold",
        "ELO_VELOCITY_CHANGED" => "the rate of Elo improvement changed",
        "REGRESSION_DETECTED" => "a model performs worse than the one before it",
        "REGRESSION_CRITICAL" => "a model regressed badly enough to roll back",
    ],
    "promotion": [
        "MODEL_PROMOTED" | "PROMOTION_COMPLETE" | "PROMOTED" => "a model became the current best",
        "PROMOTION_REJECTED" => "a candidate model was not promoted",
        "PROMOTION_FAILED" => "the promotion step failed",
        "MODEL_UPDATED" => "a model's registry metadata changed",
    ],
    "model_distribution": [
        "MODEL_DISTRIBUTED" | "MODEL_DISTRIBUTION_COMPLETE" => "a model arrived on a host",
        "MODEL_DISTRIBUTION_FAILED" => "a model could not be distributed to a host",
    ],
    "cluster": [
        "HOST_ONLINE" | "NODE_ONLINE" | "CLUSTER_NODE_JOINED" => "a host joined or came back",
        "NODE_SUSPECT" | "HOST_SUSPECT" | "CLUSTER_NODE_SUSPECT" => "a host stopped answering and is suspected",
        "HOST_OFFLINE" | "NODE_OFFLINE" | "NODE_DEAD" | "CLUSTER_NODE_LEFT" => "a host was declared dead",
        "NODE_RECOVERED" | "HOST_RECOVERED" | "CLUSTER_NODE_RECOVERED" => "a suspected host answered again",
        "HOST_LEFT" | "NODE_LEFT" | "CLUSTER_HOST_LEFT" => "a host left gracefully",
        "LEADER_ELECTED" | "CLUSTER_LEADER_ELECTED" => "a new leader won a term",
        "IDLE_RESOURCE_DETECTED" | "CLUSTER_IDLE_RESOURCE_DETECTED" => "a host's GPUs (or job counters) stayed idle",
    ],
    "daemon": [
        "DAEMON_STARTED" => "a local daemon started",
        "DAEMON_STOPPED" => "a local daemon stopped",
        "DAEMON_STATUS_CHANGED" => "a local daemon changed state",
        "ALL_CRITICAL_DAEMONS_READY" => "every critical daemon of a host is up",
        "TASK_ABANDONED" => "a job was cancelled or abandoned",
    ],
    "recovery": [
        "RECOVERY_STARTED" => "automatic recovery began",
        "RECOVERY_COMPLETED" | "RECOVERY_COMPLETE" => "automatic recovery finished",
        "RECOVERY_FAILED" => "automatic recovery failed",
    ],
    "quality": [
        "CURRICULUM_UPDATED" => "the curriculum changed its weights",
        "CURRICULUM_ADVANCED" => "the curriculum moved to its next stage",
        "CURRICULUM_REBALANCED" => "the curriculum rebalanced its configurations",
        "QUALITY_DEGRADED" => "data quality went down",
        "QUALITY_SCORE_UPDATED" => "a data quality score was computed",
        "QUALITY_ALERT" | "DATA_QUALITY_ALERT" => "data quality fell below its threshold",
    ],
}

/// Whether a canonical name is a catalog type.
pub fn is_known(canonical: &str) -> bool {
    CATALOG.iter().any(|t| t.name == canonical)
}

/// The catalog name a custom name is most likely a typo of: a catalog name
/// or alias within `max(1, len / 8)` edits (optimal string alignment:
/// insertions, deletions, substitutions, adjacent swaps; `len` is the
/// catalog spelling's length, so 1 edit up to 15 characters, 2 from 16).
/// Names under 5 characters are never taken for typos.
pub fn likely_typo(canonical: &str) -> Option<&'static str> {
    if canonical.len() < 5 || is_known(canonical) {
        return None;
    }
    CATALOG
        .iter()
        .flat_map(|t| {
            std::iter::once(t.name)
                .chain(t.aliases.iter().copied())
                .map(move |s| (t.name, s))
        })
        // The distance is at least the difference in length: most
        // spellings are ruled out without computing it.
        .filter(|&(_, spelling)| {
            canonical.len().abs_diff(spelling.len()) <= (spelling.len() / 8).max(1)
        })
        .map(|(name, spelling)| {
            (
                strsim::osa_distance(canonical, spelling),
                spelling.len(),
                name,
            )
        })
        .filter(|&(d, len, _)| d <= (len / 8).max(1))
        .min_by_key(|&(d, _, _)| d)
        .map(|(_, _, name)| name)
}

/// What a *local* publisher or consumer may name (proto-notes/events.md §2,
/// "Names a local process may use"): a catalog type; a declared custom type;
/// or, unless `strict`, any other well-formed name that is not a likely typo
/// of a catalog name (`custom` lets a near name through on purpose). Never
/// applied to events from peers: catalogs differ during a rolling upgrade.
pub fn check_local_type(
    canonical: &str,
    custom: bool,
    strict: bool,
    declared: &[String],
) -> Result<(), String> {
    if is_known(canonical) || declared.iter().any(|d| d == canonical) {
        return Ok(());
    }
    if strict {
        return Err(format!(
            "type {canonical} is not in the catalog (riftmesh types) and strict_types is on: \
             declare it in the config's custom_types"
        ));
    }
    if !custom {
        if let Some(near) = likely_typo(canonical) {
            return Err(format!(
                "unknown type {canonical}: did you mean {near}? (to publish a new type of this \
                 name on purpose, send \"custom_type\": true, or --custom with the CLI)"
            ));
        }
    }
    Ok(())
}

/// Normalize any accepted spelling to the canonical UPPER_SNAKE name.
/// `training.completed`, `training_complete` and `TRAINING_COMPLETED` all give
/// `TRAINING_COMPLETED`; unknown well-formed names become custom types.
pub fn normalize_type(raw: &str) -> Result<String, EventError> {
    let out = type_spelling(raw)?;
    for t in CATALOG {
        if t.name == out || t.aliases.contains(&out.as_str()) {
            return Ok(t.name.to_string());
        }
    }
    Ok(out)
}

/// The UPPER_SNAKE spelling of a well-formed type name, without the
/// catalog's aliases: what a receiver requires of an event's type. A peer
/// with another catalog (a rolling upgrade that made a name its own type,
/// as CURRICULUM_ADVANCED) sends names this agent would alias; they are
/// kept as sent, never refused.
pub fn type_spelling(raw: &str) -> Result<String, EventError> {
    let bad = || EventError::BadType(raw.chars().take(MAX_TYPE_LEN + 8).collect());
    let s = raw.trim();
    if s.is_empty() || s.len() > MAX_TYPE_LEN || !s.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(bad());
    }
    let mut out = String::with_capacity(s.len());
    let mut prev_sep = false;
    for c in s.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' => {
                out.push(c.to_ascii_uppercase());
                prev_sep = false;
            }
            '_' | '.' | '-' => {
                if prev_sep {
                    return Err(bad());
                }
                out.push('_');
                prev_sep = true;
            }
            _ => return Err(bad()),
        }
    }
    if prev_sep {
        return Err(bad());
    }
    Ok(out)
}
