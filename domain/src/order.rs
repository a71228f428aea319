//! The deploy order: placed with a hold on the wallet, then provisioned (the hold is captured as
//! the first hour) or failed (the hold is released in full). Each happens at most once.

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::types::{AccountId, ChargeId, Location, OrderId, PlanId, ServerId};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum OrderEvent {
    OrderPlaced {
        order_id: OrderId,
        account_id: AccountId,
        server_id: ServerId,
        plan_id: PlanId,
        location: Location,
        net: Decimal,
        tax: Decimal,
        gross: Decimal,
        at: DateTime<Utc>,
    },
    OrderCompleted {
        charge_id: ChargeId,
        at: DateTime<Utc>,
    },
    OrderFailed {
        reason: String,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        match self {
            OrderEvent::OrderPlaced { .. } => "OrderPlaced",
            OrderEvent::OrderCompleted { .. } => "OrderCompleted",
            OrderEvent::OrderFailed { .. } => "OrderFailed",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OrderCommand {
    Place {
        order_id: OrderId,
        account_id: AccountId,
        server_id: ServerId,
        plan_id: PlanId,
        location: Location,
        net: Decimal,
        tax: Decimal,
        at: DateTime<Utc>,
    },
    Complete {
        charge_id: ChargeId,
        at: DateTime<Utc>,
    },
    Fail {
        reason: String,
        at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("the order already exists")]
    AlreadyPlaced,
    #[error("no such order")]
    NotFound,
    #[error("the order is already completed")]
    AlreadyCompleted,
    #[error("the order already failed")]
    AlreadyFailed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Placed,
    Completed,
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub placed: Option<Placed>,
    pub status: Option<OrderStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    pub order_id: OrderId,
    pub account_id: AccountId,
    pub server_id: ServerId,
    pub plan_id: PlanId,
    pub net: Decimal,
    pub tax: Decimal,
}

impl Order {
    fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match (command, self.status) {
            (
                OrderCommand::Place {
                    order_id,
                    account_id,
                    server_id,
                    plan_id,
                    location,
                    net,
                    tax,
                    at,
                },
                None,
            ) => Ok(vec![OrderEvent::OrderPlaced {
                order_id,
                account_id,
                server_id,
                plan_id,
                location,
                net,
                tax,
                gross: net + tax,
                at,
            }]),
            (OrderCommand::Place { .. }, Some(_)) => Err(OrderError::AlreadyPlaced),
            (_, None) => Err(OrderError::NotFound),
            (_, Some(OrderStatus::Completed)) => Err(OrderError::AlreadyCompleted),
            (_, Some(OrderStatus::Failed)) => Err(OrderError::AlreadyFailed),
            (OrderCommand::Complete { charge_id, at }, Some(OrderStatus::Placed)) => Ok(vec![OrderEvent::OrderCompleted { charge_id, at }]),
            (OrderCommand::Fail { reason, at }, Some(OrderStatus::Placed)) => Ok(vec![OrderEvent::OrderFailed { reason, at }]),
        }
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    type Services = ();

    async fn handle(&mut self, command: OrderCommand, _: &(), sink: &cqrs_es::event_sink::EventSink<Self>) -> Result<(), OrderError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: OrderEvent) {
        match event {
            OrderEvent::OrderPlaced {
                order_id,
                account_id,
                server_id,
                plan_id,
                net,
                tax,
                ..
            } => {
                self.placed = Some(Placed {
                    order_id,
                    account_id,
                    server_id,
                    plan_id,
                    net,
                    tax,
                });
                self.status = Some(OrderStatus::Placed);
            }
            OrderEvent::OrderCompleted { .. } => self.status = Some(OrderStatus::Completed),
            OrderEvent::OrderFailed { .. } => self.status = Some(OrderStatus::Failed),
        }
    }
}
