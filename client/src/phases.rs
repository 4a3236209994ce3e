//! Where a wrapper call's time went, for the debug log.

/// The milliseconds of each phase, in order; displays as `phase=ms ...`.
pub struct Phases {
    last: std::time::Instant,
    laps: Vec<(&'static str, u128)>,
}

impl Phases {
    pub fn start() -> Phases {
        Phases { last: std::time::Instant::now(), laps: Vec::new() }
    }

    pub fn lap(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((phase, (now - self.last).as_millis()));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, ms)) in self.laps.iter().enumerate() {
            write!(f, "{}{phase}={ms}", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}
