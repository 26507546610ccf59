pub mod proto {
    tonic::include_proto!("synthome.status.v1");
}

pub mod simulator;
