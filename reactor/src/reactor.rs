//! The dispatch loop.

use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Registry, Token};

use crate::channel::{channel, Receiver, Sender};
use crate::timer::{TimerId, Timers};

/// The token reserved for the polled channel's waker. Machines use slab
/// indices, which stay far below it.
pub const WAKER_TOKEN: Token = Token(usize::MAX);

/// Upper bound on one sleep, so a lost wake-up can never stall a thread for
/// long (belt and braces; the channel does not lose wake-ups by design).
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Readiness of one socket, copied out of a mio event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    /// Bytes (or EOF) can be read.
    pub readable: bool,
    /// Bytes can be written.
    pub writable: bool,
    /// The peer closed its write half, or the socket failed.
    pub closed: bool,
    /// The socket reported an error.
    pub error: bool,
}

impl Ready {
    fn from_event(e: &mio::event::Event) -> Self {
        Self {
            readable: e.is_readable(),
            writable: e.is_writable(),
            closed: e.is_read_closed() || e.is_write_closed(),
            error: e.is_error(),
        }
    }
}

/// What a handler may do while it handles something: register sockets, set
/// and cancel deadlines, read the loop's clock, ask the loop to stop.
pub struct Context<'a, T> {
    registry: &'a Registry,
    timers: &'a mut Timers<T>,
    now: Instant,
    stop: &'a mut bool,
    again: &'a mut bool,
}

impl<T> Context<'_, T> {
    /// The registry to (de)register sockets with.
    pub fn registry(&self) -> &Registry {
        self.registry
    }

    /// The time the current batch of events was taken; cheaper and more
    /// consistent than calling `Instant::now()` per machine.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Schedules `payload` to come back through [`Handler::timeout`] at `at`.
    pub fn set_timer(&mut self, at: Instant, payload: T) -> TimerId {
        self.timers.schedule(at, payload)
    }

    /// Cancels a deadline set earlier; harmless when it has fired.
    pub fn cancel_timer(&mut self, id: TimerId) {
        self.timers.cancel(id);
    }

    /// Asks for another batch without sleeping: a machine stopped short of
    /// WouldBlock (to be fair to the others) and, with edge-triggered
    /// readiness, no new event would wake it.
    pub fn again(&mut self) {
        *self.again = true;
    }

    /// Ends [`Reactor::run`] after the current batch.
    pub fn stop(&mut self) {
        *self.stop = true;
    }
}

/// The state machines of one thread, as seen by the loop.
pub trait Handler {
    /// Commands other threads send through the polled channel.
    type Cmd: Send + 'static;
    /// What a deadline carries back.
    type Timer;

    /// A registered socket became ready.
    fn ready(&mut self, cx: &mut Context<'_, Self::Timer>, token: Token, ready: Ready);
    /// A command arrived.
    fn command(&mut self, cx: &mut Context<'_, Self::Timer>, cmd: Self::Cmd);
    /// A deadline expired.
    fn timeout(&mut self, cx: &mut Context<'_, Self::Timer>, id: TimerId, timer: Self::Timer);
    /// Runs once after every batch: the place to free machines that closed
    /// during the batch, so a slot is never reused while events for its
    /// previous owner may still be pending in the same batch.
    fn after_batch(&mut self, _cx: &mut Context<'_, Self::Timer>) {}
}

/// One `mio::Poll`, its command channel and its deadlines.
pub struct Reactor<C, T> {
    poll: Poll,
    events: Events,
    rx: Receiver<C>,
    timers: Timers<T>,
}

impl<C: Send + 'static, T> Reactor<C, T> {
    /// A reactor and the sender through which other threads command it.
    pub fn new() -> io::Result<(Self, Sender<C>)> {
        let poll = Poll::new()?;
        let (tx, rx) = channel(poll.registry(), WAKER_TOKEN)?;
        Ok((
            Self {
                poll,
                events: Events::with_capacity(1024),
                rx,
                timers: Timers::default(),
            },
            tx,
        ))
    }

    /// The registry, to register sockets before [`Reactor::run`].
    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// Dispatches until a handler calls [`Context::stop`].
    pub fn run<H: Handler<Cmd = C, Timer = T>>(&mut self, handler: &mut H) -> io::Result<()> {
        let mut stop = false;
        let mut again = false;
        while !stop {
            let timeout = if again {
                Duration::ZERO
            } else {
                self.timers
                    .next_timeout(Instant::now())
                    .map_or(MAX_SLEEP, |t| t.min(MAX_SLEEP))
            };
            again = false;
            match self.poll.poll(&mut self.events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            let mut cx = Context {
                registry: self.poll.registry(),
                timers: &mut self.timers,
                now: Instant::now(),
                stop: &mut stop,
                again: &mut again,
            };
            for event in self.events.iter() {
                if event.token() == WAKER_TOKEN {
                    for cmd in self.rx.drain() {
                        handler.command(&mut cx, cmd);
                    }
                } else {
                    handler.ready(&mut cx, event.token(), Ready::from_event(event));
                }
            }
            let now = cx.now;
            while let Some((id, timer)) = cx.timers.pop_expired(now) {
                handler.timeout(&mut cx, id, timer);
            }
            handler.after_batch(&mut cx);
        }
        Ok(())
    }
}

/// A loop that never polls, for tests of a [`Handler`]: the test plays the
/// events (calling the handler's methods with [`TestLoop::context`]), moves
/// the clock ([`TestLoop::advance`]) and fires the deadlines that fall due
/// ([`TestLoop::fire`]), so timeouts are tested without waiting for them.
/// Its registry is a real poll's, which nothing ever waits on.
pub struct TestLoop<T> {
    poll: Poll,
    timers: Timers<T>,
    now: Instant,
    stop: bool,
    again: bool,
}

impl<T> TestLoop<T> {
    /// A loop at the current time with no deadline set.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            poll: Poll::new()?,
            timers: Timers::default(),
            now: Instant::now(),
            stop: false,
            again: false,
        })
    }

    /// What a handler gets while it handles something, at the loop's time.
    pub fn context(&mut self) -> Context<'_, T> {
        Context {
            registry: self.poll.registry(),
            timers: &mut self.timers,
            now: self.now,
            stop: &mut self.stop,
            again: &mut self.again,
        }
    }

    /// Its registry (a channel's waker may be registered with it).
    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// The loop's clock.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Moves the clock on (deadlines fire only through [`TestLoop::fire`]).
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Deadlines set and not yet fired or cancelled.
    pub fn timers(&self) -> usize {
        self.timers.len()
    }

    /// Runs the handler on every deadline due by now, in order, then its
    /// `after_batch`, as the loop would. Returns how many fired.
    pub fn fire<H: Handler<Timer = T>>(&mut self, handler: &mut H) -> usize {
        let mut fired = 0;
        let mut cx = Context {
            registry: self.poll.registry(),
            timers: &mut self.timers,
            now: self.now,
            stop: &mut self.stop,
            again: &mut self.again,
        };
        while let Some((id, timer)) = cx.timers.pop_expired(self.now) {
            handler.timeout(&mut cx, id, timer);
            fired += 1;
        }
        handler.after_batch(&mut cx);
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Echo {
        out: mpsc::Sender<String>,
        fired: u32,
    }

    enum Cmd {
        Say(String),
        Later(u64),
        Stop,
    }

    impl Handler for Echo {
        type Cmd = Cmd;
        type Timer = u64;
        fn ready(&mut self, _: &mut Context<'_, u64>, _: Token, _: Ready) {}
        fn command(&mut self, cx: &mut Context<'_, u64>, cmd: Cmd) {
            match cmd {
                Cmd::Say(s) => self.out.send(s).unwrap(),
                Cmd::Later(ms) => {
                    let at = cx.now() + Duration::from_millis(ms);
                    cx.set_timer(at, ms);
                }
                Cmd::Stop => cx.stop(),
            }
        }
        fn timeout(&mut self, _: &mut Context<'_, u64>, _: TimerId, ms: u64) {
            self.fired += 1;
            self.out.send(format!("timer {ms}")).unwrap();
        }
    }

    #[test]
    fn commands_from_other_threads_and_timers_arrive_in_order() {
        let (mut reactor, tx) = Reactor::<Cmd, u64>::new().unwrap();
        let (out_tx, out_rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut h = Echo {
                out: out_tx,
                fired: 0,
            };
            reactor.run(&mut h).unwrap();
            h.fired
        });
        for i in 0..100 {
            tx.send(Cmd::Say(format!("m{i}"))).unwrap();
        }
        for i in 0..100 {
            assert_eq!(out_rx.recv().unwrap(), format!("m{i}"));
        }
        tx.send(Cmd::Later(30)).unwrap();
        tx.send(Cmd::Later(10)).unwrap();
        assert_eq!(out_rx.recv().unwrap(), "timer 10");
        assert_eq!(out_rx.recv().unwrap(), "timer 30");
        tx.send(Cmd::Stop).unwrap();
        assert_eq!(t.join().unwrap(), 2);
        assert!(
            tx.send(Cmd::Stop).is_err(),
            "receiver dropped with the reactor"
        );
    }
}
