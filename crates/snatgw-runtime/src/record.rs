//! `snatgw run --record FILE`: writes the gateway's real flows in the planner's trace format
//! (docs/PLANNER.md), for `snatgw plan --trace FILE`.
//!
//! The data plane's engine keeps a flow journal (`Engine::set_journal`); `run` drains it once
//! per housekeeping tick under the engine lock and hands the same slice to every consumer
//! (`run::feed_journal`). [`Recorder::offer`] copies the slice into a bounded channel and
//! returns at once — it never blocks and never does I/O under the lock; a writer thread turns
//! the changes into trace records (`snatgw_planner::TraceRecorder`) and appends them to the
//! file, flushing after each batch so a killed gateway still leaves a usable trace. If the
//! writer falls [`BACKLOG`] batches behind, further batches are dropped and counted; the count
//! is logged when recording stops, and written to the file as a comment line.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

use snatgw_core::topology::Params;
use snatgw_core::FlowChange;
use snatgw_planner::TraceRecorder;

/// Batches (one per housekeeping tick, 100 ms) the writer may fall behind before batches are
/// dropped.
pub const BACKLOG: usize = 256;

struct Batch {
    changes: Vec<FlowChange>,
    params: Params,
    /// Changes dropped before this batch (written as a comment line).
    lost_before: u64,
}

/// What a finished recording wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Trace records written.
    pub records: u64,
    /// Closes whose open was not recorded (flows older than the recording).
    pub unmatched: u64,
    /// Journal changes dropped because the writer was behind.
    pub lost: u64,
}

/// Why the recorder could not start or did not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The trace file could not be created or written.
    #[error("--record {path}: {source}")]
    Write {
        /// The trace file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("spawning the recorder thread: {0}")]
    Spawn(std::io::Error),
    /// The writer thread panicked.
    #[error("the recorder thread panicked")]
    Panicked,
}

/// A running recorder (see the module documentation).
pub struct Recorder {
    tx: Option<SyncSender<Batch>>,
    thread: Option<JoinHandle<Result<(u64, u64), RecordError>>>,
    lost: u64,
    lost_unreported: u64,
}

impl Recorder {
    /// Creates (truncates) `path`, writes the trace header and starts the writer thread.
    pub fn start(path: &Path) -> Result<Recorder, RecordError> {
        let shown = path.display().to_string();
        let failed = |source| RecordError::Write {
            path: shown.clone(),
            source,
        };
        let f = File::create(path).map_err(failed)?;
        let mut out = BufWriter::with_capacity(1 << 16, f);
        out.write_all(TraceRecorder::header().as_bytes())
            .and_then(|()| out.flush())
            .map_err(failed)?;
        let (tx, rx) = sync_channel::<Batch>(BACKLOG);
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                let mut conv = TraceRecorder::new();
                let mut text = String::new();
                for b in rx {
                    text.clear();
                    if b.lost_before > 0 {
                        text.push_str(&format!(
                            "# recorder: {} flow changes dropped here (writer behind)\n",
                            b.lost_before
                        ));
                    }
                    conv.write(&b.changes, &b.params, &mut text);
                    out.write_all(text.as_bytes())
                        .and_then(|()| out.flush())
                        .map_err(|source| RecordError::Write {
                            path: shown.clone(),
                            source,
                        })?;
                }
                Ok((conv.records, conv.unmatched))
            })
            .map_err(RecordError::Spawn)?;
        Ok(Recorder {
            tx: Some(tx),
            thread: Some(thread),
            lost: 0,
            lost_unreported: 0,
        })
    }

    /// Queues a copy of `changes` for the writer; never blocks.
    pub fn offer(&mut self, changes: &[FlowChange], params: Params) {
        let Some(tx) = &self.tx else { return };
        let b = Batch {
            changes: changes.to_vec(),
            params,
            lost_before: self.lost_unreported,
        };
        match tx.try_send(b) {
            Ok(()) => self.lost_unreported = 0,
            Err(TrySendError::Full(b)) | Err(TrySendError::Disconnected(b)) => {
                self.lost += b.changes.len() as u64;
                self.lost_unreported += b.changes.len() as u64;
            }
        }
    }

    /// Stops the writer after it wrote everything queued.
    pub fn finish(mut self) -> Result<Summary, RecordError> {
        drop(self.tx.take());
        let (records, unmatched) = match self.thread.take() {
            Some(h) => h.join().map_err(|_| RecordError::Panicked)??,
            None => (0, 0),
        };
        Ok(Summary {
            records,
            unmatched,
            lost: self.lost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snatgw_core::{DropReason, EndCause, FlowKey, Topology};

    #[test]
    fn writes_a_trace_the_planner_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let params = Topology::from_config(Default::default()).unwrap().params;
        let key = FlowKey {
            proto: 6,
            src: 0x0a00_010a,
            sport: 40000,
            dst: 0xc633_640a,
            dport: 443,
            public: 0xc000_0214,
            pport: 1024,
        };
        let mut r = Recorder::start(&path).unwrap();
        r.offer(
            &[
                FlowChange::Opened {
                    at: 3,
                    instance: "vm1".into(),
                    slot: 0,
                    by_fast_path: false,
                    key,
                },
                FlowChange::Refused {
                    at: 4,
                    instance: "vm1".into(),
                    slot: 0,
                    key: FlowKey {
                        sport: 40001,
                        pport: 0,
                        ..key
                    },
                    reason: DropReason::PortsExhausted,
                },
            ],
            params,
        );
        // Released 240 s after the FIN both ways (R3.2): the close record is at the FIN.
        r.offer(
            &[FlowChange::Closed {
                at: 250,
                instance: "vm1".into(),
                slot: 0,
                key,
                cause: EndCause::Fin,
            }],
            params,
        );
        let s = r.finish().unwrap();
        assert_eq!((s.records, s.unmatched, s.lost), (3, 0, 0));
        let text = std::fs::read_to_string(&path).unwrap();
        let w = snatgw_planner::Workload::from_trace_str(&text).unwrap();
        assert_eq!(w.flows.len(), 2);
        assert!(w.flows[1].refused);
        let close = w
            .events
            .iter()
            .find(|e| e.kind != snatgw_planner::EvKind::Open);
        assert_eq!(close.map(|e| e.t_ms), Some(10_000), "{text}");
    }
}
