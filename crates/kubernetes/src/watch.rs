//! One watcher per Kubernetes namespace the daemon uses, on the Pods carrying this
//! daemon's label, shared by every instance there (never a watch per Pod).
//!
//! The stream is kube-runtime's [`watcher`](kube::runtime::watcher): it lists, then
//! watches from the list's resource version, and relists after a `410 Gone` (the
//! resource version expired) or a broken watch, with kube's default backoff between
//! failures. Events are routed to the handles by Pod name:
//!
//! | event | what the handle learns |
//! |---|---|
//! | `Apply` / `InitApply` | the Pod as it is now ([`crate::status::observe`]) |
//! | `Delete` | the Pod is gone: its last state is the exit |
//! | `InitDone` | a watched Pod absent from the new list was deleted while no watch ran: it is fetched once (`GET`) and, if missing, reported gone |

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};

use crate::handle::PodHandle;

/// The watcher of one namespace.
pub(crate) struct Watcher {
    namespace: String,
    sinks: Mutex<HashMap<String, Weak<PodHandle>>>,
}

impl Watcher {
    /// Starts watching `namespace` for Pods matching `selector`; the task ends once the
    /// returned watcher is dropped (checked at each event).
    pub(crate) fn start(client: Client, namespace: &str, selector: &str) -> Arc<Watcher> {
        let w = Arc::new(Watcher {
            namespace: namespace.to_owned(),
            sinks: Mutex::new(HashMap::new()),
        });
        let api: Api<Pod> = Api::namespaced(client, namespace);
        tokio::spawn(run(Arc::downgrade(&w), api, selector.to_owned()));
        w
    }

    pub(crate) fn register(&self, pod: &str, sink: Weak<PodHandle>) {
        self.lock().insert(pod.to_owned(), sink);
    }

    pub(crate) fn unregister(&self, pod: &str) {
        self.lock().remove(pod);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<PodHandle>>> {
        self.sinks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sink(&self, pod: &str) -> Option<Arc<PodHandle>> {
        let mut m = self.lock();
        match m.get(pod).map(Weak::upgrade) {
            Some(Some(s)) => Some(s),
            Some(None) => {
                m.remove(pod);
                None
            }
            None => None,
        }
    }

    fn watched(&self) -> Vec<(String, Arc<PodHandle>)> {
        self.lock()
            .iter()
            .filter_map(|(n, w)| Some((n.clone(), w.upgrade()?)))
            .collect()
    }
}

async fn run(w: Weak<Watcher>, api: Api<Pod>, selector: String) {
    let cfg = watcher::Config::default().labels(&selector);
    let mut stream = watcher::watcher(api.clone(), cfg).default_backoff().boxed();
    let mut listed: HashSet<String> = HashSet::new();
    while let Some(ev) = stream.next().await {
        let Some(w) = w.upgrade() else { return };
        match ev {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(pod)) => {
                let name = pod.name_any();
                if let Some(s) = w.sink(&name) {
                    s.observe(&pod);
                }
                listed.insert(name);
            }
            Ok(Event::InitDone) => {
                // Watched Pods the list did not have: deleted while no watch ran, or
                // created after the list was taken. One GET tells which.
                for (name, sink) in w.watched() {
                    if listed.contains(&name) {
                        continue;
                    }
                    let api = api.clone();
                    tokio::spawn(async move {
                        match api.get_opt(&name).await {
                            Ok(Some(pod)) => sink.observe(&pod),
                            // Registered before its create (so that no event is
                            // missed): a list taken before the create answered does
                            // not have it, and neither may this GET. Gone only once seen.
                            Ok(None) if sink.seen.load(std::sync::atomic::Ordering::SeqCst) => {
                                sink.gone(None)
                            }
                            Ok(None) => {}
                            Err(e) => tracing::warn!("cannot read pod {name}: {e}"),
                        }
                    });
                }
                listed.clear();
            }
            Ok(Event::Apply(pod)) => {
                if let Some(s) = w.sink(&pod.name_any()) {
                    s.observe(&pod);
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(s) = w.sink(&pod.name_any()) {
                    s.gone(Some(&pod));
                }
            }
            Err(e) => tracing::warn!(
                "kubernetes watch of pods in namespace {} ({selector}): {e}",
                w.namespace
            ),
        }
    }
}
