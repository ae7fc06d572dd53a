//! Fault models and schedules ("chaos chihuahua").
//!
//! Nothing here yet: fault schedules for the simulation and for real processes arrive after the
//! simulation issue (#5).
