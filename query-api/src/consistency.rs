//! Read-your-writes: a read carrying a consistency token (the stream position a write
//! returned) waits, bounded, until every projection the read uses has applied it.
//!
//! A projection's checkpoint only moves when an event of *its* aggregate kind arrives, so a
//! token from a course write could wait forever on the students projection. A projection
//! has therefore "reached" position `P` when its checkpoint is at least `P`, or when the
//! last event of its kind in the stream (a direct get by wildcard subject, any replica) is
//! at or below its checkpoint (and `P` is not beyond the stream's end): then every event it
//! will ever see up to `P` is applied.
//!
//! A token past the end of the stream names no event that was ever stored (a command's
//! token is only answered once the broker stored its events): no write of the client's can
//! be missing, so the read waits for the stream's current end instead (asked of the stream
//! leader, since a direct get may be answered by a replica that lags) rather than timing
//! out into a `503` that no retry would cure.
//!
//! The wait also tells the cache how fresh an entry must be: an entry read at a position at
//! or after `required` reflects every event of that kind up to the token.

use std::time::Duration;

use events::{Projection, StreamNames};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use service_kit::metrics;

use crate::models::{ReadError, ReadModels};

/// How long a direct get may take before the stream is treated as unknown for this check.
const STREAM_CHECK_TIMEOUT: Duration = Duration::from_millis(250);
/// First and longest pause between two checks.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(25);
/// A token is lowered to the stream's end only if the end lies before it twice, this far
/// apart. A leader that was paused or cut off resumes answering as leader, with its old end,
/// until it hears of the new term: about a second after its routes come back here (the
/// nemesis found reads with their writes' tokens lowered in that window).
const END_CONFIRMATION: Duration = Duration::from_millis(1500);

/// Per projection, the position a cached entry must have been read at to be served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Required {
    pub students: u64,
    pub courses: u64,
}

impl Required {
    pub fn of(&self, projection: Projection) -> u64 {
        match projection {
            Projection::Students => self.students,
            Projection::Courses => self.courses,
        }
    }

    fn set(&mut self, projection: Projection, position: u64) {
        match projection {
            Projection::Students => self.students = position,
            Projection::Courses => self.courses = position,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the read model has not reached position {0} in time")]
    TimedOut(u64),
    #[error(transparent)]
    Unavailable(#[from] ReadError),
}

#[derive(Clone)]
pub struct Consistency {
    models: ReadModels,
    /// Without NATS, only the checkpoints are compared (a token of another kind then waits
    /// for the next event of this kind, or times out).
    nats: Option<async_nats::Client>,
    names: StreamNames,
    max_wait: Duration,
    waits: Counter<u64>,
    wait_seconds: Histogram<f64>,
}

impl Consistency {
    pub fn new(
        models: ReadModels,
        nats: Option<async_nats::Client>,
        names: StreamNames,
        max_wait: Duration,
    ) -> Self {
        let meter = metrics::meter();
        Consistency {
            models,
            nats,
            names,
            max_wait,
            waits: meter
                .u64_counter("query.consistency.waits")
                .with_description(
                    "Reads that carried a consistency token, by outcome: reached, timeout",
                )
                .build(),
            wait_seconds: metrics::seconds_histogram(
                "query.consistency.wait.duration",
                "Time reads with a consistency token spent waiting for the projections",
            ),
        }
    }

    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Waits until every projection in `projections` has reached `token` (or the end of the
    /// stream, for a token past it).
    pub async fn wait_for(
        &self,
        token: u64,
        projections: &[Projection],
    ) -> Result<Required, WaitError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.max_wait;
        let mut required = Required::default();
        let mut token = token;
        let mut asked_leader = false;
        for &projection in projections {
            let mut pause = FIRST_PAUSE;
            loop {
                match self.reached(projection, token).await? {
                    Reached::Yes(position) => {
                        required.set(projection, position);
                        break;
                    }
                    Reached::NotYet => {}
                    Reached::PastStreamEnd if !asked_leader => {
                        // Asked again on the next round while the answer is not trusted.
                        if let Some(end) = self.confirmed_stream_end(token).await {
                            asked_leader = true;
                            if end < token {
                                token = end;
                                continue;
                            }
                        }
                    }
                    Reached::PastStreamEnd => {}
                }
                if tokio::time::Instant::now() + pause > deadline {
                    self.record("timeout", started);
                    return Err(WaitError::TimedOut(token));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
        self.record("reached", started);
        Ok(required)
    }

    fn record(&self, outcome: &'static str, started: tokio::time::Instant) {
        self.waits.add(1, &[KeyValue::new("outcome", outcome)]);
        self.wait_seconds.record(
            started.elapsed().as_secs_f64(),
            &[KeyValue::new("outcome", outcome)],
        );
    }

    /// `Yes(required entry position)` once `projection` reflects every event up to `token`.
    async fn reached(&self, projection: Projection, token: u64) -> Result<Reached, ReadError> {
        let applied = self.models.applied_position(projection).await?;
        if applied >= token {
            return Ok(Reached::Yes(token));
        }
        // Read after the checkpoint: if the newest event of this kind is not newer than the
        // checkpoint read before, nothing of this kind lies between the checkpoint and the
        // token, provided the token names an event that is stored (not one from the future).
        let kind = self
            .names
            .aggregate_kind_subjects(projection.source_aggregate());
        let newest_of_kind = match self.last_sequence(&kind).await {
            Some(LastEvent::None) => 0,
            Some(LastEvent::At(last)) if last <= applied => last,
            Some(LastEvent::At(_)) | None => return Ok(Reached::NotYet),
        };
        match self.last_sequence(&self.names.event_subjects()).await {
            Some(LastEvent::At(stream_last)) if token <= stream_last => {
                Ok(Reached::Yes(newest_of_kind))
            }
            Some(LastEvent::At(_) | LastEvent::None) => Ok(Reached::PastStreamEnd),
            None => Ok(Reached::NotYet),
        }
    }

    /// [`Consistency::stream_end`], asked again after [`END_CONFIRMATION`] when it lies
    /// before `token`: the second answer is the one to lower the token to.
    async fn confirmed_stream_end(&self, token: u64) -> Option<u64> {
        let first = self.stream_end().await?;
        if first >= token {
            return Some(first);
        }
        tokio::time::sleep(END_CONFIRMATION).await;
        self.stream_end().await
    }

    /// The stream's last sequence as its leader knows it (stream info); `None` when the
    /// stream cannot be asked right now, or when the answer may be stale.
    ///
    /// A token is lowered to this end, so it must not come from a replica that only
    /// believes it leads: a leader paused (or cut off) past an election resumes still
    /// answering as leader until it hears of the new term, with the end it had (the nemesis
    /// test found a read-your-writes read lowered that way). Trusted only when the
    /// answering leader heard from a majority of the replicas within the last second.
    async fn stream_end(&self) -> Option<u64> {
        let nats = self.nats.as_ref()?;
        let jetstream = async_nats::jetstream::new(nats.clone());
        let stream = self.names.event_stream();
        match tokio::time::timeout(STREAM_CHECK_TIMEOUT, jetstream.get_stream(&stream)).await {
            Ok(Ok(stream)) => {
                let info = stream.cached_info();
                if leader_in_contact(info.config.num_replicas, info.cluster.as_ref()) {
                    Some(info.state.last_sequence)
                } else {
                    tracing::warn!(
                        "the stream leader's end is not trusted: it has not heard from a majority lately"
                    );
                    None
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot ask the stream leader for the stream's end");
                None
            }
            Err(_) => {
                tracing::warn!("asking the stream leader for the stream's end timed out");
                None
            }
        }
    }

    /// The stream sequence of the newest event on `subjects` (wildcards allowed); `None`
    /// when the stream cannot be asked right now.
    async fn last_sequence(&self, subjects: &str) -> Option<LastEvent> {
        let nats = self.nats.as_ref()?;
        let stream = self.names.event_stream();
        match service_kit::nats::last_sequence_on(nats, &stream, subjects, STREAM_CHECK_TIMEOUT)
            .await
        {
            Ok(Some(sequence)) => Some(LastEvent::At(sequence)),
            Ok(None) => Some(LastEvent::None),
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot ask the stream for its last event"
                );
                None
            }
        }
    }
}

/// Longest silence of a follower a leader may report and still be trusted to lead: Raft
/// heartbeats go out every second, an election takes 4 to 9 s of silence.
const FOLLOWER_SILENCE: Duration = Duration::from_secs(3);

/// Whether a stream leader's answer is its own as a leader with quorum: together with the
/// followers it heard from within [`FOLLOWER_SILENCE`] (and that are current), a majority
/// of `replicas`. A single-replica stream has no one to hear from.
fn leader_in_contact(
    replicas: usize,
    cluster: Option<&async_nats::jetstream::stream::ClusterInfo>,
) -> bool {
    if replicas <= 1 {
        return true;
    }
    let Some(cluster) = cluster else {
        return false;
    };
    let heard = cluster
        .replicas
        .iter()
        .filter(|peer| peer.current && !peer.offline && peer.active <= FOLLOWER_SILENCE)
        .count();
    cluster.leader.is_some() && 1 + heard > replicas / 2
}

/// Whether a projection reflects a token.
enum Reached {
    /// It does; the cache must serve entries read at or after this position.
    Yes(u64),
    NotYet,
    /// Every event of the projection's kind is applied, but the token lies past the last
    /// event the stream leader had a moment ago: a token that names no stored event (yet).
    PastStreamEnd,
}

enum LastEvent {
    /// The stream holds no event of this kind.
    None,
    At(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(
        leader: bool,
        replicas: &[(bool, f64)],
    ) -> async_nats::jetstream::stream::ClusterInfo {
        let peers: Vec<serde_json::Value> = replicas
            .iter()
            .enumerate()
            .map(|(i, (current, active_s))| {
                serde_json::json!({"name": format!("n{i}"), "current": current, "active": (active_s * 1e9) as u64, "offline": false})
            })
            .collect();
        let mut info = serde_json::json!({"name": "c", "replicas": peers});
        if leader {
            info["leader"] = "n9".into();
        }
        serde_json::from_value(info).expect("cluster info")
    }

    #[test]
    fn a_leader_is_trusted_only_with_a_majority_heard_from_lately() {
        assert!(leader_in_contact(1, None), "a single replica needs no one");
        assert!(!leader_in_contact(3, None));
        assert!(leader_in_contact(
            3,
            Some(&cluster(true, &[(true, 0.2), (true, 0.4)]))
        ));
        assert!(
            leader_in_contact(3, Some(&cluster(true, &[(true, 0.2), (false, 12.0)]))),
            "one follower and the leader are a majority of 3"
        );
        // A leader resumed after a pause past an election: it last heard of both 11 s ago.
        assert!(!leader_in_contact(
            3,
            Some(&cluster(true, &[(true, 11.0), (true, 11.2)]))
        ));
        assert!(!leader_in_contact(
            3,
            Some(&cluster(false, &[(true, 0.2), (true, 0.2)]))
        ));
        assert!(!leader_in_contact(
            5,
            Some(&cluster(
                true,
                &[(true, 0.2), (false, 0.2), (true, 9.0), (true, 9.0)]
            ))
        ));
    }
}
