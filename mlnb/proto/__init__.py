"The Open Inference Protocol (v2) gRPC service definition and its generated modules (`make proto` regenerates them)."
