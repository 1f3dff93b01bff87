//! One matrix cell's repeats, and the spread (median, min–max) of a
//! figure over them: what the table and the plot both show.

use crate::plan::Case;
use crate::run::RunResult;

pub use crate::spread::Spread;

/// The repeats of one matrix cell.
#[derive(Debug, Clone)]
pub struct Cell {
    pub case: Case,
    /// The date of the run (raw file) its repeats come from: ratios
    /// between cells hold only within one run.
    pub run: String,
    pub runs: Vec<RunResult>,
    pub failed: usize,
}

impl Cell {
    pub fn spread(&self, f: impl Fn(&RunResult) -> f64) -> Option<Spread> {
        Spread::of(self.runs.iter().map(f))
    }
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn medians_and_ranges() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Spread::of([]).is_none());
        assert!(Spread::of([f64::NAN]).is_none());
    }
}
