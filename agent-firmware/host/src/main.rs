use caas_protocol::*;
fn main(){
 println!("cmd frame {} report frame {} cmd {} report {}", MAX_COMMAND_FRAME_SIZE, MAX_REPORT_FRAME_SIZE, MAX_COMMAND_SIZE, MAX_REPORT_SIZE);
 println!("Command {} Report {} DesiredState {} Grant {}", core::mem::size_of::<Command>(), core::mem::size_of::<Report>(), core::mem::size_of::<DesiredState>(), core::mem::size_of::<Grant>());
}
