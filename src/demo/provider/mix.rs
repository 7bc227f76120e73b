//! A flaky provider's answers: each token call's answer drawn at random from weighted answers (a
//! few per cent of 429s, 503s, dropped connections...), the default answer the rest of the time.
//! The generator is seeded, so a run can be repeated with the same sequence of answers.

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use super::Answer;

#[derive(Debug)]
pub(super) struct Mix {
    /// (probability, answer); the probabilities add up to at most 1.
    answers: Vec<(f64, Answer)>,
    rng: StdRng,
}

impl Mix {
    /// Panics when a rate is not in 0..=1 or the rates add up to more than 1: a script error.
    pub(super) fn new(answers: &[(f64, Answer)], seed: u64) -> Mix {
        let total: f64 = answers.iter().map(|(rate, _)| rate).sum();
        assert!(
            answers.iter().all(|(rate, _)| (0.0..=1.0).contains(rate)) && total <= 1.0,
            "Provider::set_mix: rates must be in 0..=1 and add up to at most 1"
        );
        Mix {
            answers: answers.to_vec(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The answer drawn for one call, or `None` for the default answer.
    pub(super) fn draw(&mut self) -> Option<Answer> {
        let mut roll: f64 = self.rng.random();
        for (rate, answer) in &self.answers {
            if roll < *rate {
                return Some(answer.clone());
            }
            roll -= rate;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drops(mix: &mut Mix, calls: usize) -> Vec<bool> {
        (0..calls)
            .map(|_| matches!(mix.draw(), Some(Answer::Drop)))
            .collect()
    }

    #[test]
    fn answers_come_at_their_rates_in_a_sequence_the_seed_repeats() {
        let answers = [(0.25, Answer::Drop), (0.0, Answer::Garbage)];
        let first = drops(&mut Mix::new(&answers, 7), 10_000);
        let share = first.iter().filter(|d| **d).count() as f64 / 10_000.0;
        assert!((0.23..0.27).contains(&share), "{share}");
        assert_eq!(drops(&mut Mix::new(&answers, 7), 10_000), first);
        assert_ne!(drops(&mut Mix::new(&answers, 8), 10_000), first);
    }

    #[test]
    #[should_panic(expected = "add up to at most 1")]
    fn rates_over_one_are_refused() {
        Mix::new(&[(0.6, Answer::Drop), (0.6, Answer::Garbage)], 1);
    }
}
