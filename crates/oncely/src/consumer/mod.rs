//! The effectively-once consumer runtime (in progress).
#![allow(missing_docs)]
#[derive(Debug)]
pub struct Consumer;
#[derive(Debug)]
pub struct ConsumerBuilder;
#[derive(Debug)]
pub struct Cx;
#[derive(Debug)]
pub struct HandlerError;
#[derive(Debug)]
pub enum RewindPolicy {
    Skip,
}
