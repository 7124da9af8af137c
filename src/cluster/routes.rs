//! The Bus with direct links: a frame for a client on another instance goes over a link to
//! the instance the directory names for it; Redis carries the announcements, and the frames
//! for anyone the directory cannot place (another instance's manager, a client still
//! connecting, an instance without a link).
//!
//! Each address has a route: the link it takes, or Redis, and how many of its frames are on
//! their way. A route changes only once all its frames on the old way are answered, and a
//! frame the old instance no longer holds is sent again (once) the new way before anything
//! newer: frames from one sender to one client keep their order across a move. Every frame
//! counted on a route is answered exactly once, also when its sender stops waiting for room or
//! its link goes away ([`Owed`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::future::BoxFuture;
use tokio::sync::Notify;

use super::bus::{Announcement, Bus, BusError, Delivered, Sending};
use super::link::{Link, LinkKey, Outgoing};

/// How long a route through Redis holds before the directory is asked again.
const FALLBACK_HOLDS: Duration = Duration::from_secs(2);
/// How long a route through Redis must have been quiet before it moves to a link: a frame
/// Redis took may still wait in the receiving instance's queue, and the link must not
/// overtake it.
const QUIET_BEFORE_LINK: Duration = Duration::from_millis(100);
/// How long an instance that could not be dialed is left alone.
const DIAL_BACKOFF: Duration = Duration::from_secs(5);
/// Routes kept; past this, the idle ones are forgotten.
const MAX_ROUTES: usize = 100_000;

/// Where a client lives, as far as the directory knows.
pub(crate) trait Locator: Send + Sync {
    /// The other instance holding `addr`, with the address its link listens on; `None` when
    /// no instance with a link is known to hold it.
    fn locate<'a>(
        &'a self,
        addr: &'a str,
    ) -> BoxFuture<'a, Result<Option<(String, String)>, BusError>>;
    /// Whether any other instance listens for links at all (else nothing is looked up).
    fn any_links(&self) -> bool;
}

/// The way a route's frames go now.
#[derive(Clone)]
enum Via {
    /// Not known: the directory is asked before the next frame.
    Unknown,
    Link(Arc<Link>),
    /// Through the fallback bus, until the instant given.
    Fallback(Instant),
}

impl Via {
    fn usable(&self) -> bool {
        match self {
            Via::Unknown => false,
            Via::Link(link) => !link.is_closed(),
            Via::Fallback(until) => Instant::now() < *until,
        }
    }

    fn is(&self, link: &Arc<Link>) -> bool {
        matches!(self, Via::Link(l) if Arc::ptr_eq(l, link))
    }
}

/// One address's way and the frames on it.
struct Route {
    addr: Arc<str>,
    state: Mutex<RouteState>,
    /// Rung when the last frame on the way is answered.
    drained: Notify,
    /// Held by whoever changes the way.
    changing: tokio::sync::Mutex<()>,
}

struct RouteState {
    via: Via,
    /// Frames counted (sent, or about to be) and not yet answered.
    in_flight: usize,
    /// Frames the old instance no longer held, to go the new way first.
    again: VecDeque<Sending>,
    /// The link whose instance gave frames back: not trusted with them again this time.
    refused_by: Option<Arc<Link>>,
    /// When a frame last went through the fallback.
    last_fallback: Option<Instant>,
}

impl Route {
    fn idle(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.in_flight == 0 && s.again.is_empty())
            .unwrap_or(false)
    }

    /// Waits until no frame of this route is on its way.
    async fn drain(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.state.lock().map(|s| s.in_flight == 0).unwrap_or(true) {
                return;
            }
            drained.await;
        }
    }
}

/// A frame counted on its route: its sender hears exactly once what became of it, with the
/// frame back, and the count goes down with that. Dropped unanswered (its sender stopped
/// waiting for room, or a bus dropped the callback holding it uncalled), it answers with an
/// error and the frame it still holds (none once handed on).
struct Owed {
    shared: Arc<Shared>,
    route: Arc<Route>,
    /// The frame (until it is handed on) and whom to tell; `None` once told.
    frame: Option<Sending>,
}

impl Owed {
    /// The frame, to hand on (whatever takes it gives it back with the answer).
    fn take_frame(&mut self) -> Bytes {
        self.frame
            .as_mut()
            .map(Sending::take_data)
            .unwrap_or_default()
    }

    /// Tells the sender (with its frame back) and uncounts the frame.
    fn settle(mut self, answer: Result<bool, BusError>, data: Bytes) {
        if let Some(mut frame) = self.frame.take() {
            self.shared.uncount(&self.route, None);
            frame.put_data(data);
            frame.tell(answer);
        }
    }

    /// The instance behind `link` no longer holds the client: the frame goes back to its
    /// route, to be sent again the new way before anything newer.
    fn give_back(mut self, link: &Arc<Link>, data: Bytes) {
        if let Some(mut frame) = self.frame.take() {
            frame.put_data(data);
            self.shared
                .uncount(&self.route, Some((link.clone(), frame)));
        }
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        if let Some(frame) = self.frame.take() {
            self.shared.uncount(&self.route, None);
            // Told as it drops, with what it still holds.
            drop(frame);
        }
    }
}

/// An instance's link (with the address it was dialed at), or when it may be dialed again.
enum Slot {
    Up(Arc<Link>, String),
    Failed(Instant),
}

/// What the bus and the links' answers share.
struct Shared {
    fallback: Arc<dyn Bus>,
    locator: Arc<dyn Locator>,
    me: String,
    key: LinkKey,
    max_frame: usize,
    routes: DashMap<Arc<str>, Arc<Route>>,
    links: Mutex<HashMap<String, Slot>>,
    /// One dial at a time per instance.
    dialing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The Bus of an instance that links directly to the others (see the module's text).
pub(crate) struct LinkBus {
    shared: Arc<Shared>,
}

impl LinkBus {
    /// Links to the other instances found by `locator`, and leaves to `fallback` the
    /// announcements, subscriptions and what cannot be placed.
    pub(crate) fn new(
        fallback: Arc<dyn Bus>,
        locator: Arc<dyn Locator>,
        me: String,
        key: LinkKey,
        max_frame: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                fallback,
                locator,
                me,
                key,
                max_frame,
                routes: DashMap::new(),
                links: Mutex::new(HashMap::new()),
                dialing: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Shared {
    fn route(&self, addr: &str) -> Arc<Route> {
        if let Some(route) = self.routes.get(addr) {
            return route.clone();
        }
        if self.routes.len() >= MAX_ROUTES {
            self.routes
                .retain(|_, r| Arc::strong_count(r) > 1 || !r.idle());
        }
        let addr: Arc<str> = addr.into();
        self.routes
            .entry(addr.clone())
            .or_insert_with(|| {
                Arc::new(Route {
                    addr,
                    state: Mutex::new(RouteState {
                        via: Via::Unknown,
                        in_flight: 0,
                        again: VecDeque::new(),
                        refused_by: None,
                        last_fallback: None,
                    }),
                    drained: Notify::new(),
                    changing: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// A frame counted on `route` from now on.
    fn owed(self: &Arc<Self>, route: &Arc<Route>, frame: Sending) -> Owed {
        Owed {
            shared: self.clone(),
            route: route.clone(),
            frame: Some(frame),
        }
    }

    /// The route's way if a frame may take it now (then counted as on its way).
    fn take_way(route: &Route) -> Option<Via> {
        let mut state = route.state.lock().ok()?;
        if !state.again.is_empty() || !state.via.usable() {
            return None;
        }
        state.in_flight += 1;
        Some(state.via.clone())
    }

    /// One frame of `route` is answered, or (`back`) given back by the link's instance. The
    /// last answer on the way wakes whoever waits to change it; frames given back with nobody
    /// waiting to take them the new way get a task that does.
    fn uncount(self: &Arc<Self>, route: &Arc<Route>, back: Option<(Arc<Link>, Sending)>) {
        let (drained, stranded) = match route.state.lock() {
            Ok(mut state) => {
                if let Some((link, frame)) = back {
                    if state.via.is(&link) {
                        state.via = Via::Unknown;
                    }
                    state.refused_by = Some(link);
                    state.again.push_back(frame);
                }
                state.in_flight = state.in_flight.saturating_sub(1);
                let drained = state.in_flight == 0;
                (drained, drained && !state.again.is_empty())
            }
            Err(_) => (false, false),
        };
        if !drained {
            return;
        }
        // Only someone holding `changing` waits for the drain.
        if route.changing.try_lock().is_err() {
            route.drained.notify_waiters();
        }
        if stranded && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.clone().resend(route.clone()));
        }
    }

    /// Hands a frame to its route's link at once where the route has one, nothing is to go
    /// before it and the link's queue has room; else gives the frame and `then` back.
    fn try_send(
        self: &Arc<Self>,
        addr: &str,
        data: Bytes,
        then: Delivered,
    ) -> Result<(), (Bytes, Delivered)> {
        let route = self.route(addr);
        let link = {
            let Ok(mut state) = route.state.lock() else {
                return Err((data, then));
            };
            let Via::Link(link) = &state.via else {
                return Err((data, then));
            };
            if !state.again.is_empty() || link.is_closed() {
                return Err((data, then));
            }
            let link = link.clone();
            // Counted under the same lock that saw the way: the way cannot change meanwhile.
            state.in_flight += 1;
            link
        };
        let Some(permit) = link.try_reserve() else {
            // Taken back; the waiting path counts it again.
            self.uncount(&route, None);
            return Err((data, then));
        };
        let owed = self.owed(&route, Sending::new(data, then));
        permit.send(Self::outgoing(&route, &link, owed, false));
        Ok(())
    }

    async fn send(
        self: &Arc<Self>,
        addr: &str,
        data: Bytes,
        then: Delivered,
    ) -> Result<(), BusError> {
        let route = self.route(addr);
        // Not counted yet; told if its sender stops waiting for the way to change.
        let frame = Sending::new(data, then);
        if let Some(via) = Self::take_way(&route) {
            let owed = self.owed(&route, frame);
            self.dispatch(&route, via, owed, false).await;
            return Ok(());
        }
        let _changing = route.changing.lock().await;
        if let Some(via) = Self::take_way(&route) {
            let owed = self.owed(&route, frame);
            self.dispatch(&route, via, owed, false).await;
            return Ok(());
        }
        let via = self.change_way(&route).await;
        let owed = self.owed(&route, frame);
        self.dispatch(&route, via, owed, false).await;
        Ok(())
    }

    /// Finds the route's new way once its old one is drained and sends what the old instance
    /// gave back; the caller holds `changing` and sends one frame more, already counted.
    async fn change_way(self: &Arc<Self>, route: &Arc<Route>) -> Via {
        route.drain().await;
        let (old, refused_by, last_fallback) = match route.state.lock() {
            Ok(mut state) => (
                state.via.clone(),
                state.refused_by.take(),
                state.last_fallback,
            ),
            Err(_) => (Via::Unknown, None, None),
        };
        let through_redis_lately = matches!(old, Via::Fallback(_))
            && last_fallback.is_some_and(|at| at.elapsed() < QUIET_BEFORE_LINK);
        let mut via = if through_redis_lately {
            Via::Fallback(Instant::now() + FALLBACK_HOLDS)
        } else {
            self.find_way(&route.addr).await
        };
        // The directory may still name the instance that just gave the frames back (the
        // client's new instance has not claimed it yet): Redis reaches it wherever it is.
        if refused_by.is_some_and(|refused| via.is(&refused)) {
            via = Via::Fallback(Instant::now() + FALLBACK_HOLDS);
        }
        // What the old instance gave back goes first, each owed from here on (a cancel below
        // answers the rest); the way stays unknown until all of it is queued, so that no
        // sender's newer frame overtakes its own older one.
        let again: Vec<Owed> = match route.state.lock() {
            Ok(mut state) => {
                state.in_flight += state.again.len();
                state.again.drain(..).collect()
            }
            Err(_) => Vec::new(),
        }
        .into_iter()
        .map(|frame| self.owed(route, frame))
        .collect();
        for owed in again {
            self.dispatch(route, via.clone(), owed, true).await;
        }
        if let Ok(mut state) = route.state.lock() {
            state.via = via.clone();
            state.in_flight += 1;
        }
        via
    }

    /// Sends what the old instance gave back when no sender came to do it.
    async fn resend(self: Arc<Self>, route: Arc<Route>) {
        let _changing = route.changing.lock().await;
        let waiting = route
            .state
            .lock()
            .map(|s| !s.again.is_empty())
            .unwrap_or(false);
        if waiting {
            self.change_way(&route).await;
            // `change_way` counted one frame more for a sender; there is none.
            self.uncount(&route, None);
        }
    }

    /// Asks the directory where `addr` lives and links there; Redis where that fails.
    async fn find_way(&self, addr: &str) -> Via {
        let fallback = Via::Fallback(Instant::now() + FALLBACK_HOLDS);
        // Without Redis the directory cannot answer: no sender waits for it to time out.
        if !self.locator.any_links() || !self.fallback.is_up() {
            return fallback;
        }
        let (instance, address) = match self.locator.locate(addr).await {
            Ok(Some(found)) => found,
            Ok(None) => return fallback,
            Err(e) => {
                tracing::debug!(error = %e, client = addr, "cannot place a client; through Redis");
                return fallback;
            }
        };
        match self.link_to(&instance, &address).await {
            Some(link) => Via::Link(link),
            None => fallback,
        }
    }

    /// The link to `instance` at `address`, dialed if needed; `None` while it cannot be
    /// reached. A link dialed at another address (the instance restarted elsewhere) is
    /// replaced.
    async fn link_to(&self, instance: &str, address: &str) -> Option<Arc<Link>> {
        let known = |links: &HashMap<String, Slot>| match links.get(instance) {
            Some(Slot::Up(link, at)) if !link.is_closed() && at == address => {
                Some(Some(link.clone()))
            }
            Some(Slot::Failed(until)) if Instant::now() < *until => Some(None),
            _ => None,
        };
        if let Some(found) = self.links.lock().ok().and_then(|l| known(&l)) {
            return found;
        }
        let dialing = self
            .dialing
            .lock()
            .ok()?
            .entry(instance.to_string())
            .or_default()
            .clone();
        let _dialing = dialing.lock().await;
        if let Some(found) = self.links.lock().ok().and_then(|l| known(&l)) {
            return found;
        }
        let dialed = Link::dial(address, &self.me, instance, &self.key, self.max_frame).await;
        let slot = match &dialed {
            Ok(link) => {
                tracing::info!(%instance, %address, "linked to another instance");
                Slot::Up(link.clone(), address.to_string())
            }
            Err(e) => {
                tracing::warn!(%instance, %address, error = %e, "cannot link to another instance; its frames go through Redis for now");
                Slot::Failed(Instant::now() + DIAL_BACKOFF)
            }
        };
        if let Ok(mut links) = self.links.lock()
            && let Some(Slot::Up(old, _)) = links.insert(instance.to_string(), slot)
        {
            old.close();
        }
        dialed.ok()
    }

    /// Sends the frame `owed` holds the way given; `owed` hears its answer (a frame the
    /// link's instance no longer holds goes back to the route, once).
    async fn dispatch(
        self: &Arc<Self>,
        route: &Arc<Route>,
        via: Via,
        mut owed: Owed,
        second_try: bool,
    ) {
        let link = match via {
            Via::Link(link) => link,
            Via::Unknown | Via::Fallback(_) => {
                if let Ok(mut state) = route.state.lock() {
                    state.last_fallback = Some(Instant::now());
                }
                let data = owed.take_frame();
                let then: Delivered = Box::new(move |delivered, data| owed.settle(delivered, data));
                if let Err(e) = self.fallback.send_then(&route.addr, data, then).await {
                    // `owed` went with the refused frame and answered.
                    tracing::debug!(error = %e, "the fallback bus refused a frame");
                }
                return;
            }
        };
        // Waiting for room may be cancelled with the sender: `owed` then answers, with the
        // frame it still holds.
        let Some(permit) = link.reserve().await else {
            let data = owed.take_frame();
            owed.settle(Err(BusError("the instance link closed".into())), data);
            return;
        };
        permit.send(Self::outgoing(route, &link, owed, second_try));
    }

    /// The frame `owed` holds, for `link`'s queue: a frame the link's instance no longer
    /// holds goes back to the route (unless this is its second try), a broken link leaves the
    /// route.
    fn outgoing(
        route: &Arc<Route>,
        link: &Arc<Link>,
        mut owed: Owed,
        second_try: bool,
    ) -> Outgoing {
        let on_link = link.clone();
        let data = owed.take_frame();
        Outgoing::new(
            route.addr.clone(),
            data,
            Box::new(move |answer, data| match answer {
                Ok(false) if !second_try => owed.give_back(&on_link, data),
                answer => {
                    if answer.is_err()
                        && let Ok(mut state) = owed.route.state.lock()
                        && state.via.is(&on_link)
                    {
                        state.via = Via::Unknown;
                    }
                    owed.settle(answer, data);
                }
            }),
        )
    }

    /// Forgets an instance that is gone: its link closes, its frames are answered.
    fn forget(&self, instance: &str) {
        let slot = self.links.lock().ok().and_then(|mut l| l.remove(instance));
        if let Some(Slot::Up(link, _)) = slot {
            link.close();
        }
        if let Ok(mut dialing) = self.dialing.lock() {
            dialing.remove(instance);
        }
    }
}

impl Bus for LinkBus {
    fn send<'a>(&'a self, addr: &'a str, data: Bytes) -> BoxFuture<'a, Result<bool, BusError>> {
        Box::pin(async move {
            let (done, answer) = tokio::sync::oneshot::channel();
            let then: Delivered = Box::new(move |delivered, _| {
                let _ = done.send(delivered);
            });
            self.shared.send(addr, data, then).await?;
            answer
                .await
                .map_err(|_| BusError("the frame was lost on its way".into()))?
        })
    }

    fn send_then<'a>(
        &'a self,
        addr: &'a str,
        data: Bytes,
        then: Delivered,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(self.shared.send(addr, data, then))
    }

    fn try_send_then(
        &self,
        addr: &str,
        data: Bytes,
        then: Delivered,
    ) -> Result<(), (Bytes, Delivered)> {
        self.shared.try_send(addr, data, then)
    }

    fn announce(&self, announcement: Announcement) -> BoxFuture<'_, Result<(), BusError>> {
        self.shared.fallback.announce(announcement)
    }

    fn attach<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        self.shared.fallback.attach(addr)
    }

    fn detach<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, ()> {
        self.shared.fallback.detach(addr)
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn is_up(&self) -> bool {
        self.shared.fallback.is_up()
    }

    fn links_up(&self) -> usize {
        self.shared
            .links
            .lock()
            .map(|links| {
                links
                    .values()
                    .filter(|slot| matches!(slot, Slot::Up(link, _) if !link.is_closed()))
                    .count()
            })
            .unwrap_or(0)
    }

    fn instance_gone(&self, instance: &str) {
        self.shared.forget(instance);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::link::{LinkListener, Receiver};
    use std::collections::HashSet;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    /// An instance at the far end of a link: which clients it holds, what it was given.
    #[derive(Default)]
    struct Far {
        holds: Mutex<HashSet<String>>,
        got: Mutex<Vec<(String, Bytes)>>,
    }

    impl Receiver for Far {
        async fn deliver(&self, to: &str, data: Bytes) -> Option<bool> {
            if !self.holds.lock().unwrap().contains(to) {
                return Some(false);
            }
            self.got.lock().unwrap().push((to.to_string(), data));
            Some(true)
        }
    }

    impl Far {
        fn numbers(&self) -> Vec<u32> {
            let got = self.got.lock().unwrap();
            got.iter()
                .map(|(_, d)| u32::from_be_bytes(d[..4].try_into().unwrap()))
                .collect()
        }
    }

    /// Redis as the tests need it: counts what it carried and holds nobody.
    #[derive(Default)]
    struct Redisless {
        carried: Mutex<Vec<String>>,
    }

    impl Bus for Redisless {
        fn send<'a>(&'a self, _: &'a str, _: Bytes) -> BoxFuture<'a, Result<bool, BusError>> {
            Box::pin(async { Ok(false) })
        }
        fn send_then<'a>(
            &'a self,
            addr: &'a str,
            data: Bytes,
            then: Delivered,
        ) -> BoxFuture<'a, Result<(), BusError>> {
            self.carried.lock().unwrap().push(addr.to_string());
            then(Ok(false), data);
            Box::pin(async { Ok(()) })
        }
        fn announce(&self, _: Announcement) -> BoxFuture<'_, Result<(), BusError>> {
            Box::pin(async { Ok(()) })
        }
        fn attach<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
            Box::pin(async { Ok(()) })
        }
        fn detach<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }
        fn is_shared(&self) -> bool {
            true
        }
    }

    /// The directory as the tests set it: address -> (instance, link address).
    #[derive(Default)]
    struct Places(Mutex<HashMap<String, (String, String)>>);

    impl Locator for Places {
        fn locate<'a>(
            &'a self,
            addr: &'a str,
        ) -> BoxFuture<'a, Result<Option<(String, String)>, BusError>> {
            let found = self.0.lock().unwrap().get(addr).cloned();
            Box::pin(async move { Ok(found) })
        }
        fn any_links(&self) -> bool {
            true
        }
    }

    const SECRET: &[u8] = b"the instances' secret";

    /// Starts instance `id`'s link listener; returns its address.
    async fn far(id: &str, secret: &[u8], far: &Arc<Far>, stop: &CancellationToken) -> String {
        let listener =
            LinkListener::bind("127.0.0.1:0", id.into(), LinkKey::derive(secret), 1 << 20)
                .await
                .unwrap();
        let address = format!("127.0.0.1:{}", listener.port());
        tokio::spawn(listener.serve(far.clone(), stop.clone()));
        address
    }

    /// Sends frames numbered `numbers` to `addr`, one after the other as one sender does (at
    /// once where it can, else waiting); returns their answers once all came, each of which
    /// gave its frame back.
    async fn send_all(
        bus: &LinkBus,
        addr: &str,
        numbers: std::ops::Range<u32>,
    ) -> Vec<Result<bool, BusError>> {
        send_all_counting(bus, addr, numbers).await.0
    }

    /// [`send_all`], and how many frames were handed on at once (`try_send_then`).
    async fn send_all_counting(
        bus: &LinkBus,
        addr: &str,
        numbers: std::ops::Range<u32>,
    ) -> (Vec<Result<bool, BusError>>, usize) {
        let mut at_once = 0;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let count = numbers.len();
        for n in numbers {
            let tx = tx.clone();
            let then: Delivered = Box::new(move |answer, data| {
                let _ = tx.send((n, answer, data));
            });
            let data = Bytes::copy_from_slice(&n.to_be_bytes());
            // Both ways the hub sends, mixed for the one sender: at once where it can (else
            // waiting), and waiting.
            if n % 3 == 2 {
                bus.send_then(addr, data, then).await.unwrap();
            } else {
                match bus.try_send_then(addr, data, then) {
                    Ok(()) => at_once += 1,
                    Err((data, then)) => bus.send_then(addr, data, then).await.unwrap(),
                }
            }
        }
        let mut answers = Vec::with_capacity(count);
        while answers.len() < count {
            let (n, answer, data) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("every frame is answered")
                .unwrap();
            assert_eq!(&data[..], &n.to_be_bytes()[..], "frame {n} comes back");
            answers.push((n, answer));
        }
        answers.sort_by_key(|(n, _)| *n);
        (answers.into_iter().map(|(_, a)| a).collect(), at_once)
    }

    /// Whether every answer is `want` (delivered, or nowhere to be found).
    fn all_are(answers: &[Result<bool, BusError>], want: bool) -> bool {
        answers.iter().all(|a| matches!(a, Ok(got) if *got == want))
    }

    /// Instance a's bus, instances b (with `b_secret`) and c with their links listening, and
    /// the client `ws/x` on b.
    struct World {
        stop: CancellationToken,
        b: Arc<Far>,
        c: Arc<Far>,
        at_b: String,
        at_c: String,
        places: Arc<Places>,
        redis: Arc<Redisless>,
        bus: Arc<LinkBus>,
    }

    impl World {
        async fn new(b_secret: &[u8]) -> Self {
            let stop = CancellationToken::new();
            let (b, c) = (Arc::new(Far::default()), Arc::new(Far::default()));
            let at_b = far("b", b_secret, &b, &stop).await;
            let at_c = far("c", SECRET, &c, &stop).await;
            let places = Arc::new(Places::default());
            let redis = Arc::new(Redisless::default());
            let bus = Arc::new(LinkBus::new(
                redis.clone(),
                places.clone(),
                "a".into(),
                LinkKey::derive(SECRET),
                1 << 20,
            ));
            let world = Self {
                stop,
                b,
                c,
                at_b,
                at_c,
                places,
                redis,
                bus,
            };
            world.b.holds.lock().unwrap().insert("ws/x".into());
            world.place(Some("b"));
            world
        }

        /// What the directory says of `ws/x`: on b, on c, or nowhere.
        fn place(&self, instance: Option<&str>) {
            let mut places = self.places.0.lock().unwrap();
            match instance {
                Some(id) => {
                    let at = if id == "b" { &self.at_b } else { &self.at_c };
                    places.insert("ws/x".into(), (id.into(), at.clone()));
                }
                None => {
                    places.clear();
                }
            }
        }

        /// The client moves from b to c, and the directory hears of it.
        fn move_to_c(&self) {
            self.c.holds.lock().unwrap().insert("ws/x".into());
            self.place(Some("c"));
            self.b.holds.lock().unwrap().clear();
        }

        fn carried_by_redis(&self) -> usize {
            self.redis.carried.lock().unwrap().len()
        }
    }

    #[tokio::test]
    async fn frames_follow_a_client_from_one_instance_to_another_in_order() {
        let w = World::new(SECRET).await;
        let (answers, at_once) = send_all_counting(&w.bus, "ws/x", 0..200).await;
        assert!(all_are(&answers, true), "{answers:?}");
        assert!(
            at_once > 100,
            "the link took most frames at once: {at_once}"
        );
        assert_eq!(w.b.numbers(), (0..200).collect::<Vec<_>>());
        assert_eq!(w.carried_by_redis(), 0, "nothing went through Redis");

        // The client moves to c: what b no longer holds is sent there again, before anything
        // newer, and nothing is lost or doubled.
        w.move_to_c();
        let answers = send_all(&w.bus, "ws/x", 200..400).await;
        assert!(all_are(&answers, true), "{answers:?}");
        assert_eq!(w.b.numbers(), (0..200).collect::<Vec<_>>());
        assert_eq!(w.c.numbers(), (200..400).collect::<Vec<_>>());
        assert_eq!(w.carried_by_redis(), 0);

        // It leaves altogether: the directory has it nowhere, so Redis is asked and says no.
        w.c.holds.lock().unwrap().clear();
        w.place(None);
        let answers = send_all(&w.bus, "ws/x", 400..410).await;
        assert!(all_are(&answers, false), "{answers:?}");
        assert_eq!(w.carried_by_redis(), 10);
        assert_eq!(w.c.numbers().len(), 200);
        w.stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn senders_keep_their_order_when_the_client_moves_under_them() {
        const EACH: u32 = 3000;
        let w = World::new(SECRET).await;
        // Two senders at once, each numbering its own frames.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let senders: Vec<_> = (0..2u32)
            .map(|sender| {
                let (bus, tx) = (w.bus.clone(), tx.clone());
                tokio::spawn(async move {
                    for n in 0..EACH {
                        let tx = tx.clone();
                        let then: Delivered = Box::new(move |answer, _| {
                            let _ = tx.send(answer);
                        });
                        let mut data = sender.to_be_bytes().to_vec();
                        data.extend(n.to_be_bytes());
                        // As the hub sends: at once where it can, else waiting.
                        if let Err((data, then)) = bus.try_send_then("ws/x", data.into(), then) {
                            bus.send_then("ws/x", data, then).await.unwrap();
                        }
                        // A connection waits for its next frame between two: the move can
                        // come between any two frames, not only once a sender has to wait.
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        // The client moves while frames are on their way to b.
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.b.got.lock().unwrap().len() < 1000 {
            assert!(Instant::now() < deadline, "b gets frames");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w.move_to_c();
        for sender in senders {
            sender.await.unwrap();
        }
        for _ in 0..2 * EACH {
            let answer = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("every frame is answered")
                .unwrap();
            assert!(matches!(answer, Ok(true)), "{answer:?}");
        }
        let of = |far: &Far, sender: u32| -> Vec<u32> {
            let got = far.got.lock().unwrap();
            got.iter()
                .filter(|(_, d)| d[..4] == sender.to_be_bytes())
                .map(|(_, d)| u32::from_be_bytes(d[4..8].try_into().unwrap()))
                .collect()
        };
        for sender in 0..2 {
            let (before, after) = (of(&w.b, sender), of(&w.c, sender));
            let all: Vec<u32> = before.iter().chain(&after).copied().collect();
            // Each frame once, and in the order sent: everything at b before everything at c.
            assert_eq!(all, (0..EACH).collect::<Vec<_>>(), "sender {sender}");
            assert!(!after.is_empty(), "the move came before the last frames");
        }
        w.stop.cancel();
    }

    #[tokio::test]
    async fn a_client_gone_from_an_instance_the_directory_still_names_is_sought_through_redis() {
        let w = World::new(SECRET).await;
        assert!(all_are(&send_all(&w.bus, "ws/x", 0..5).await, true));
        // b lets the client go before the directory hears of it: asking b again would only
        // turn a frame Redis could still deliver into a "not connected".
        w.b.holds.lock().unwrap().clear();
        let answers = send_all(&w.bus, "ws/x", 5..10).await;
        assert!(all_are(&answers, false), "{answers:?}");
        assert_eq!(w.b.numbers(), (0..5).collect::<Vec<_>>());
        assert_eq!(w.carried_by_redis(), 5);
        w.stop.cancel();
    }

    #[tokio::test]
    async fn every_counted_frame_is_answered_once_whatever_becomes_of_it() {
        let w = World::new(SECRET).await;
        let shared = &w.bus.shared;
        let route = shared.route("ws/x");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let counted = |n: u32| {
            route.state.lock().unwrap().in_flight += 1;
            let tx = tx.clone();
            shared.owed(
                &route,
                Sending::new(
                    Bytes::copy_from_slice(&n.to_be_bytes()),
                    Box::new(move |answer, data: Bytes| {
                        let _ = tx.send((n, answer, data));
                    }),
                ),
            )
        };
        // Dropped on its way (its sender cancelled while waiting for room): an error, with the
        // frame back, and the route is not left counting it.
        drop(counted(0));
        let dropped = rx.recv().await;
        assert!(
            matches!(&dropped, Some((0, Err(_), data)) if data[..] == 0u32.to_be_bytes()),
            "{dropped:?}"
        );
        assert!(route.idle());

        // Given back by an instance while another frame is still out; that one's answer is
        // the last, and no sender comes: the frame given back still goes the new way.
        let b_link = Link::dial(&w.at_b, "a", "b", &LinkKey::derive(SECRET), 1 << 20)
            .await
            .unwrap();
        let (back, last) = (counted(1), counted(2));
        back.give_back(&b_link, Bytes::copy_from_slice(&1u32.to_be_bytes()));
        w.c.holds.lock().unwrap().insert("ws/x".into());
        w.place(Some("c"));
        last.settle(Ok(true), Bytes::new());
        assert!(matches!(rx.recv().await, Some((2, Ok(true), _))));
        let resent = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap();
        assert!(
            matches!(&resent, Some((1, Ok(true), data)) if data[..] == 1u32.to_be_bytes()),
            "{resent:?}"
        );
        assert_eq!(w.c.numbers(), vec![1]);
        assert!(route.idle());
        assert!(rx.try_recv().is_err(), "each frame was answered once");
        w.stop.cancel();
    }

    #[tokio::test]
    async fn an_instance_without_the_secret_gets_no_frames() {
        let w = World::new(b"a guess").await;
        let answers = send_all(&w.bus, "ws/x", 0..5).await;
        assert!(all_are(&answers, false), "{answers:?}");
        assert!(w.b.got.lock().unwrap().is_empty());
        assert_eq!(w.carried_by_redis(), 5, "through Redis instead");
        w.stop.cancel();
    }

    #[tokio::test]
    async fn frames_on_a_link_that_breaks_are_answered_and_later_ones_go_through_redis() {
        let w = World::new(SECRET).await;
        assert!(all_are(&send_all(&w.bus, "ws/x", 0..3).await, true));
        // b stops: its listener and links go.
        w.stop.cancel();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answers = send_all(&w.bus, "ws/x", 3..4).await;
            if matches!(answers[0], Ok(false)) {
                break;
            }
            // A frame written before the close was noticed hears an error, never silence.
            assert!(answers[0].is_err(), "{answers:?}");
            assert!(Instant::now() < deadline, "the broken link is noticed");
            tokio::task::yield_now().await;
        }
        assert!(w.carried_by_redis() > 0);
    }
}
