//! One table of behaviours every [`Store`] must have, run against each store:
//! `memory` and `file` in their unit tests, `redis` in `tests/events.rs`
//! (it needs a redis-server). Public only so that the integration suite can
//! reach it.
#![doc(hidden)]

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::{Retention, Store};

/// A step of a case.
pub enum Step {
    /// Publishes `n` events on `topic`; `old` ones are dated two hours back.
    Append {
        topic: &'static str,
        n: u64,
        old: bool,
    },
    /// Reads and checks: the ids returned (inclusive range, `(1, 0)` for
    /// none), the retained range, and the missed count for `after`.
    Read {
        topic: &'static str,
        after: u64,
        limit: usize,
        ids: (u64, u64),
        first: u64,
        last: u64,
        missed: u64,
    },
}

/// A case: a retention and its steps, run on a fresh store.
pub struct Case {
    pub name: &'static str,
    pub count: usize,
    /// Age limit in seconds.
    pub age: u64,
    pub steps: &'static [Step],
}

impl Case {
    pub fn retention(&self) -> Retention {
        Retention {
            count: self.count,
            age: Duration::from_secs(self.age),
        }
    }
}

use Step::{Append, Read};

const HOUR: u64 = 3600;

pub const CASES: &[Case] = &[
    Case {
        name: "ids-start-at-1-and-increase-by-one",
        count: 1000,
        age: HOUR,
        steps: &[
            Read {
                topic: "t",
                after: 0,
                limit: 10,
                ids: (1, 0),
                first: 1,
                last: 0,
                missed: 0,
            },
            Append {
                topic: "t",
                n: 3,
                old: false,
            },
            Read {
                topic: "t",
                after: 0,
                limit: 10,
                ids: (1, 3),
                first: 1,
                last: 3,
                missed: 0,
            },
            Read {
                topic: "t",
                after: 2,
                limit: 10,
                ids: (3, 3),
                first: 1,
                last: 3,
                missed: 0,
            },
            Read {
                topic: "t",
                after: 3,
                limit: 10,
                ids: (1, 0),
                first: 1,
                last: 3,
                missed: 0,
            },
            Read {
                topic: "t",
                after: 0,
                limit: 2,
                ids: (1, 2),
                first: 1,
                last: 3,
                missed: 0,
            },
            Append {
                topic: "t",
                n: 1,
                old: false,
            },
            Read {
                topic: "t",
                after: 3,
                limit: 10,
                ids: (4, 4),
                first: 1,
                last: 4,
                missed: 0,
            },
        ],
    },
    Case {
        name: "topics-are-independent",
        count: 1000,
        age: HOUR,
        steps: &[
            Append {
                topic: "a",
                n: 2,
                old: false,
            },
            Append {
                topic: "b",
                n: 1,
                old: false,
            },
            Read {
                topic: "b",
                after: 0,
                limit: 10,
                ids: (1, 1),
                first: 1,
                last: 1,
                missed: 0,
            },
            Read {
                topic: "a",
                after: 0,
                limit: 10,
                ids: (1, 2),
                first: 1,
                last: 2,
                missed: 0,
            },
            Read {
                topic: "c",
                after: 0,
                limit: 10,
                ids: (1, 0),
                first: 1,
                last: 0,
                missed: 0,
            },
        ],
    },
    Case {
        name: "count-retention-and-exact-missed",
        count: 3,
        age: HOUR,
        steps: &[
            Append {
                topic: "t",
                n: 10,
                old: false,
            },
            Read {
                topic: "t",
                after: 0,
                limit: 10,
                ids: (8, 10),
                first: 8,
                last: 10,
                missed: 7,
            },
            Read {
                topic: "t",
                after: 6,
                limit: 10,
                ids: (8, 10),
                first: 8,
                last: 10,
                missed: 1,
            },
            Read {
                topic: "t",
                after: 8,
                limit: 10,
                ids: (9, 10),
                first: 8,
                last: 10,
                missed: 0,
            },
        ],
    },
    Case {
        name: "age-retention",
        count: 100,
        age: HOUR,
        steps: &[
            Append {
                topic: "t",
                n: 2,
                old: true,
            },
            Append {
                topic: "t",
                n: 3,
                old: false,
            },
            Read {
                topic: "t",
                after: 0,
                limit: 10,
                ids: (3, 5),
                first: 3,
                last: 5,
                missed: 2,
            },
        ],
    },
    Case {
        name: "everything-expired-ids-still-continue",
        count: 100,
        age: HOUR,
        steps: &[
            Append {
                topic: "t",
                n: 4,
                old: true,
            },
            Read {
                topic: "t",
                after: 0,
                limit: 10,
                ids: (1, 0),
                first: 5,
                last: 4,
                missed: 4,
            },
            Append {
                topic: "t",
                n: 1,
                old: false,
            },
            Read {
                topic: "t",
                after: 0,
                limit: 10,
                ids: (5, 5),
                first: 5,
                last: 5,
                missed: 4,
            },
        ],
    },
];

/// Runs one case on `store`; topics are prefixed with the case name so one
/// shared server can run every case. Panics with the case and step on a mismatch.
pub async fn run_case(store: &dyn Store, case: &Case) {
    let mut next: HashMap<&str, u64> = HashMap::new();
    for (i, step) in case.steps.iter().enumerate() {
        let at = format!("{} ({}) step {i}", case.name, store.kind());
        match step {
            Append { topic, n, old } => {
                let full = format!("{}.{topic}", case.name);
                let time = if *old {
                    SystemTime::now() - Duration::from_secs(2 * HOUR)
                } else {
                    SystemTime::now()
                };
                for _ in 0..*n {
                    let want = next.entry(topic).or_insert(0);
                    *want += 1;
                    let data = format!("{{\"k\":{want}}}");
                    let id = store.append(&full, time, &data).await;
                    assert_eq!(id.ok(), Some(*want), "{at}: append");
                }
            }
            Read {
                topic,
                after,
                limit,
                ids,
                first,
                last,
                missed,
            } => {
                let full = format!("{}.{topic}", case.name);
                let b = match store.read(&full, *after, *limit).await {
                    Ok(b) => b,
                    Err(e) => panic!("{at}: read failed: {e}"),
                };
                let got: Vec<u64> = b.events.iter().map(|e| e.id).collect();
                let want: Vec<u64> = (ids.0..=ids.1).collect();
                assert_eq!(got, want, "{at}: ids");
                assert_eq!((b.first_id, b.last_id), (*first, *last), "{at}: range");
                assert_eq!(b.missed(*after), *missed, "{at}: missed");
                for e in &b.events {
                    assert_eq!(&*e.data, format!("{{\"k\":{}}}", e.id), "{at}: data");
                    assert!(e.time_ms > 0, "{at}: time");
                }
            }
        }
    }
}
