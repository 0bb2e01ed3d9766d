//! Where a step's time goes, phase by phase (`runtime.profile = true`).
//!
//! GPU work is asynchronous: the host reaches the end of a phase long before the device
//! does. So in profile mode every phase boundary waits for the device, and the phases'
//! wall times add up to the step's. The waits cost a little throughput (the device idles
//! while the host catches up at each boundary), which is why this is a mode and not the
//! default; outside it the clock does nothing.

use std::time::Instant;

/// Phase timers for one step; a no-op unless on.
pub struct PhaseClock {
    on: bool,
    /// CUDA device to wait for at each boundary (none on the CPU, where work is synchronous).
    cuda: Option<i64>,
    last: Instant,
    phases: Vec<(&'static str, f64)>,
}

impl PhaseClock {
    /// A clock that measures nothing.
    pub fn off() -> Self {
        PhaseClock { on: false, cuda: None, last: Instant::now(), phases: Vec::new() }
    }

    /// A clock that measures when `on`, waiting for CUDA device `cuda` at each boundary.
    pub fn new(on: bool, cuda: Option<usize>) -> Self {
        PhaseClock { on, cuda: cuda.map(|i| i as i64), ..PhaseClock::off() }
    }

    /// Whether it measures.
    pub fn is_on(&self) -> bool {
        self.on
    }

    fn now(&self) -> Instant {
        if let Some(i) = self.cuda {
            tch::Cuda::synchronize(i);
        }
        Instant::now()
    }

    /// Starts the step's first phase (forgets phases not taken).
    pub fn start(&mut self) {
        if self.on {
            self.phases.clear();
            self.last = self.now();
        }
    }

    /// Ends phase `name` (its time since the previous boundary is added to it).
    pub fn lap(&mut self, name: &'static str) {
        if !self.on {
            return;
        }
        let now = self.now();
        let seconds = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        match self.phases.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s += seconds,
            None => self.phases.push((name, seconds)),
        }
    }

    /// The step's phases so far, in the order they first ended; empties the clock.
    pub fn take(&mut self) -> Vec<(&'static str, f64)> {
        std::mem::take(&mut self.phases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_add_up_per_phase_and_nothing_is_kept_when_off() {
        let mut clock = PhaseClock::new(true, None);
        clock.start();
        std::thread::sleep(std::time::Duration::from_millis(2));
        clock.lap("a");
        clock.lap("b");
        std::thread::sleep(std::time::Duration::from_millis(2));
        clock.lap("a");
        let phases = clock.take();
        assert_eq!(phases.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["a", "b"]);
        // Both of `a`'s laps count: at least the 4 ms slept (a bound the sleeps
        // guarantee, not a speed).
        assert!(phases[0].1 >= 0.004, "{phases:?}");
        assert!(clock.take().is_empty());

        let mut off = PhaseClock::off();
        off.start();
        off.lap("a");
        assert!(!off.is_on() && off.take().is_empty());
    }
}
