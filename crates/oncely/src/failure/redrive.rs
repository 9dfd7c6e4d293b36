//! Redrive of dead letters (in progress).
